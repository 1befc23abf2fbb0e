// Projection-domain kernels for FBP/FDK: detector-row convolution with a (windowed) ramp filter
// and elementwise projection weights (cosine pre-weighting, short-scan redundancy weights).

// out[r, i] = sum_j in[r, j] * h[i - j + n_u - 1]; h has 2*n_u - 1 taps (built in kernels/filters.py).
// One thread per output element; direct convolution (no FFT) so the host twin runs the same code.
extern "C" __global__ void filter_rows(const float* __restrict__ in, float* __restrict__ out,
                                       const float* __restrict__ h, int n_rows, int n_u) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const int r = blockIdx.y * blockDim.y + threadIdx.y;
    if (i >= n_u || r >= n_rows) return;
    const float* row = in + (long)r * n_u;
    const float* taps = h + (n_u - 1 + i);
    float acc = 0.f;
    for (int j = 0; j < n_u; ++j) acc += ldg(row + j) * ldg(taps - j);
    out[(long)r * n_u + i] = acc;
}
HOST_ENTRY(filter_rows, (const float* in, float* out, const float* h, int n_rows, int n_u),
           (in, out, h, n_rows, n_u))

// proj[k, v, u] *= w_vu[v, u] * w_ku[k, u]   (either weight array may be null)
extern "C" __global__ void weight_projections(float* __restrict__ proj, const float* __restrict__ w_vu,
                                              const float* __restrict__ w_ku, int n_views, int n_v, int n_u) {
    const int u = blockIdx.x * blockDim.x + threadIdx.x;
    const int v = blockIdx.y * blockDim.y + threadIdx.y;
    const int k = blockIdx.z * blockDim.z + threadIdx.z;
    if (u >= n_u || v >= n_v || k >= n_views) return;
    float w = 1.f;
    if (w_vu) w *= ldg(w_vu + (long)v * n_u + u);
    if (w_ku) w *= ldg(w_ku + (long)k * n_u + u);
    proj[((long)k * n_v + v) * n_u + u] *= w;
}
HOST_ENTRY(weight_projections, (float* proj, const float* w_vu, const float* w_ku, int n_views, int n_v, int n_u),
           (proj, w_vu, w_ku, n_views, n_v, n_u))
