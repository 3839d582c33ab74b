"""The adapters' demos behind ``make demo-<task>``: each builds its built-in data, fine-tunes make demo's Florence
through ``florence.train`` and prints its headline figure on one line."""
