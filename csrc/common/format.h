// Formatting shared by the host-side input checks of every op (error messages name shapes as [a, b, c]).
#pragma once

#include <ATen/ATen.h>

#include <sstream>
#include <string>

namespace florence {

inline std::string sizes_str(at::IntArrayRef sizes) {
  std::ostringstream ss;
  ss << sizes;
  return ss.str();
}

}  // namespace florence
