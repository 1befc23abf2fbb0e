// Elementwise kernels around a denoising network (engines/card.py defines the arithmetic):
//   in front:  x = (clip(hu, clip_min, clip_max) - center) / scale
//   behind:    residual output: hu_out = hu_in - y * scale;  image output: hu_out = y * scale + center
// On the GPU they run on the engine's stream just before and after it (or inside it as plugins);
// the CPU twin does the same arithmetic in NumPy around ONNX Runtime, and these host-twin builds
// are checked against it.

extern "C" __global__ void hu_to_network(const float* __restrict__ hu, float* __restrict__ x, long n, float center,
                                         float scale, float clip_min, float clip_max) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    x[i] = (fminf(fmaxf(ldg(hu + i), clip_min), clip_max) - center) / scale;
}
HOST_ENTRY(hu_to_network, (const float* hu, float* x, long n, float center, float scale, float clip_min, float clip_max),
           (hu, x, n, center, scale, clip_min, clip_max))

extern "C" __global__ void network_to_hu(const float* __restrict__ hu_in, const float* __restrict__ y,
                                         float* __restrict__ hu_out, long n, float center, float scale,
                                         int residual) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    hu_out[i] = residual ? ldg(hu_in + i) - ldg(y + i) * scale : ldg(y + i) * scale + center;
}
HOST_ENTRY(network_to_hu, (const float* hu_in, const float* y, float* hu_out, long n, float center, float scale,
                           int residual),
           (hu_in, y, hu_out, n, center, scale, residual))
