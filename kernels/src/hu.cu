// Elementwise kernels around a denoising network (engines/card.py defines the arithmetic):
//   in front:  x = (clip(hu, clip_min, clip_max) - center) / scale
//   behind:    residual output: hu_out = hu_in - y * scale;  image output: hu_out = y * scale + center
// The *_plugin variants below are what runs on the GPU, inside the engine or on its stream;
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

// The same arithmetic with the calling convention of a TensorRT ahead-of-time plugin kernel: tensor inputs,
// then int32 scalars, then outputs; no float scalars (a plugin cannot pass them), so the card's numbers come
// in a small float32 tensor. The TensorRT session launches these same kernels on the engine's stream where
// the TensorRT flavour cannot embed them (engines/hu_io.py).
//   params = {center_hu, scale_hu, clip_min_hu, clip_max_hu}
//   hu: (N, C, H, W) HU; x: (N, C, H, W) network input; n = N*C*H*W.
extern "C" __global__ void hu_to_network_plugin(const float* __restrict__ hu, const float* __restrict__ params,
                                                int n, float* __restrict__ x) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    x[i] = (fminf(fmaxf(ldg(hu + i), ldg(params + 2)), ldg(params + 3)) - ldg(params + 0)) / ldg(params + 1);
}
HOST_ENTRY(hu_to_network_plugin, (const float* hu, const float* params, int n, float* x), (hu, params, n, x))

//   hu: (N, C, H, W) HU, the network's input before normalisation (its channel `centre` is the slice the
//   output belongs to); y: (N, 1, H, W) network output; hu_out: (N, 1, H, W) HU; n = N*H*W, hw = H*W.
//   residual: hu_out = hu[:, centre] - y * scale; image: hu_out = y * scale + center.
extern "C" __global__ void network_to_hu_plugin(const float* __restrict__ hu, const float* __restrict__ y,
                                                const float* __restrict__ params, int n, int hw, int channels,
                                                int centre, int residual, float* __restrict__ hu_out) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float scale = ldg(params + 1);
    if (residual) {
        const long slice = i / hw;
        hu_out[i] = ldg(hu + (slice * channels + centre) * hw + (i - slice * hw)) - ldg(y + i) * scale;
    } else {
        hu_out[i] = ldg(y + i) * scale + ldg(params + 0);
    }
}
HOST_ENTRY(network_to_hu_plugin, (const float* hu, const float* y, const float* params, int n, int hw, int channels,
                                  int centre, int residual, float* hu_out),
           (hu, y, params, n, hw, channels, centre, residual, hu_out))
