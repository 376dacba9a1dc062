"""What the kernels share and are not kernels themselves: @triton.jit helpers of the 8-bit format and of
rounding, and the launch-time facts (interpreter, tl.dot precision, current device) launchers need."""
