// Ray-driven Joseph projector, its exact adjoint, and a voxel-driven backprojector for FBP/FDK.
//
// Geometry as in kernels/geometry.py: per view 15 floats (focal spot s, unit central direction
// d, unit detector axes u and v, nominal focal spot s0), mm in the scanner frame. Volumes are
// (nz, ny, nx) float32 with voxel centres at grid[0:3] + (i*dx, j*dy, k*dz); projections are
// (n_views, n_v, n_u) float32 line integrals.
//
// Joseph's method, exactly as kernels/reference.py defines it: in continuous voxel-index
// coordinates the ray a + lam*b (lam in [0, 1] from focal spot to detector element) is sampled
// at every integer position t along its dominant axis m; each sample is the bilinear
// interpolation of that slice (zero outside the grid), weighted by |p - s| / |b_m| mm.

#define VIEW_LEN 15

struct DetectorParams {
    int n_u, n_v;
    float sdd, du, dv, u0, v0;
    int curved;
};

// Centre of detector element (iu, iv) of one view, mm.
DEVICE_INLINE void detector_pixel(const float* vw, const DetectorParams& det, float iu, float iv, float p[3]) {
    const float* d = vw + 3;
    const float* u = vw + 6;
    const float* v = vw + 9;
    const float* s0 = vw + 12;
    const float du_off = (iu - det.u0) * det.du;
    const float dv_off = (iv - det.v0) * det.dv;
    if (det.curved) {
        const float gamma = du_off / det.sdd;
        const float c = cosf(gamma) * det.sdd, sn = sinf(gamma) * det.sdd;
        for (int a = 0; a < 3; ++a) p[a] = s0[a] + c * d[a] + sn * u[a] + dv_off * v[a];
    } else {
        for (int a = 0; a < 3; ++a) p[a] = s0[a] + det.sdd * d[a] + du_off * u[a] + dv_off * v[a];
    }
}

struct Ray {
    float a[3], b[3];  // index-space start and direction
    float delta;       // mm per unit step along m
    int m, ax1, ax2;   // dominant axis and the other two (x, y, z order)
    int t_lo, t_hi;    // integer sample positions along m with lam in [0, 1], clamped to the grid
};

DEVICE_INLINE bool make_ray(const float* vw, const DetectorParams& det, const float* grid, const int dims[3],
                            int iu, int iv, Ray& r) {
    float p[3];
    detector_pixel(vw, det, (float)iu, (float)iv, p);
    float len2 = 0.f;
    for (int a = 0; a < 3; ++a) {
        const float spacing = grid[3 + a];
        r.a[a] = (vw[a] - grid[a]) / spacing;
        r.b[a] = (p[a] - vw[a]) / spacing;
        const float diff = p[a] - vw[a];
        len2 += diff * diff;
    }
    r.m = 0;
    if (fabsf(r.b[1]) > fabsf(r.b[r.m])) r.m = 1;
    if (fabsf(r.b[2]) > fabsf(r.b[r.m])) r.m = 2;
    r.ax1 = r.m == 0 ? 1 : 0;
    r.ax2 = r.m == 2 ? 1 : 2;
    const float bm = r.b[r.m];
    if (bm == 0.f) return false;
    r.delta = sqrtf(len2) / fabsf(bm);
    const float lo = fminf(r.a[r.m], r.a[r.m] + bm), hi = fmaxf(r.a[r.m], r.a[r.m] + bm);
    r.t_lo = (int)fmaxf(ceilf(lo), 0.f);
    r.t_hi = (int)fminf(floorf(hi), (float)(dims[r.m] - 1));
    return r.t_lo <= r.t_hi;
}

DEVICE_INLINE long voxel_offset(const int idx[3], const int dims[3]) {
    return ((long)idx[2] * dims[1] + idx[1]) * dims[0] + idx[0];
}

// Visits every (voxel, weight) of one ray: the samples at integer positions along the dominant
// axis and their bilinear taps (zero outside the grid). The forward projector and its adjoint
// both walk rays with this, so they stay an exact transpose pair by construction.
template <class Visitor>
DEVICE_INLINE void walk_ray(const Ray& r, const int dims[3], Visitor& visit) {
    const float inv_bm = 1.f / r.b[r.m];
    for (int t = r.t_lo; t <= r.t_hi; ++t) {
        const float lam = (t - r.a[r.m]) * inv_bm;
        const float c1 = r.a[r.ax1] + lam * r.b[r.ax1], c2 = r.a[r.ax2] + lam * r.b[r.ax2];
        const float f1 = floorf(c1), f2 = floorf(c2);
        const int i1 = (int)f1, i2 = (int)f2;
        const float w1 = c1 - f1, w2 = c2 - f2;
        for (int o2 = 0; o2 < 2; ++o2) {
            const int j2 = i2 + o2;
            if (j2 < 0 || j2 >= dims[r.ax2]) continue;
            for (int o1 = 0; o1 < 2; ++o1) {
                const int j1 = i1 + o1;
                if (j1 < 0 || j1 >= dims[r.ax1]) continue;
                int idx[3];
                idx[r.m] = t;
                idx[r.ax1] = j1;
                idx[r.ax2] = j2;
                visit(voxel_offset(idx, dims), (o1 ? w1 : 1.f - w1) * (o2 ? w2 : 1.f - w2));
            }
        }
    }
}

struct Gather {  // forward: sum of interpolated samples
    const float* volume;
    float sum;
    DEVICE_INLINE void operator()(long offset, float w) { sum += w * ldg(volume + offset); }
};

struct Scatter {  // adjoint: the same weights, added into the volume
    float* volume;
    float value;
    DEVICE_INLINE void operator()(long offset, float w) { atomicAdd(volume + offset, w * value); }
};

extern "C" __global__ void joseph_forward(const float* __restrict__ volume, float* __restrict__ proj,
                                          const float* __restrict__ views, const float* __restrict__ grid,
                                          int nx, int ny, int nz, int n_views, int n_u, int n_v, float sdd,
                                          float du, float dv, float u0, float v0, int curved) {
    const int iu = blockIdx.x * blockDim.x + threadIdx.x;
    const int iv = blockIdx.y * blockDim.y + threadIdx.y;
    const int k = blockIdx.z * blockDim.z + threadIdx.z;
    if (iu >= n_u || iv >= n_v || k >= n_views) return;
    const DetectorParams det{n_u, n_v, sdd, du, dv, u0, v0, curved};
    const int dims[3] = {nx, ny, nz};
    Ray r;
    Gather gather{volume, 0.f};
    float sum = 0.f;  // a ray that misses the grid integrates nothing
    if (make_ray(views + (long)k * VIEW_LEN, det, grid, dims, iu, iv, r)) {
        walk_ray(r, dims, gather);
        sum = gather.sum * r.delta;
    }
    proj[((long)k * n_v + iv) * n_u + iu] = sum;
}
HOST_ENTRY(joseph_forward,
           (const float* volume, float* proj, const float* views, const float* grid, int nx, int ny, int nz,
            int n_views, int n_u, int n_v, float sdd, float du, float dv, float u0, float v0, int curved),
           (volume, proj, views, grid, nx, ny, nz, n_views, n_u, n_v, sdd, du, dv, u0, v0, curved))

// Exact adjoint of joseph_forward: the same samples and weights, scattered. `volume` must be
// zeroed by the caller; contributions are added atomically.
extern "C" __global__ void joseph_adjoint(const float* __restrict__ proj, float* volume,
                                          const float* __restrict__ views, const float* __restrict__ grid,
                                          int nx, int ny, int nz, int n_views, int n_u, int n_v, float sdd,
                                          float du, float dv, float u0, float v0, int curved) {
    const int iu = blockIdx.x * blockDim.x + threadIdx.x;
    const int iv = blockIdx.y * blockDim.y + threadIdx.y;
    const int k = blockIdx.z * blockDim.z + threadIdx.z;
    if (iu >= n_u || iv >= n_v || k >= n_views) return;
    const DetectorParams det{n_u, n_v, sdd, du, dv, u0, v0, curved};
    const int dims[3] = {nx, ny, nz};
    Ray r;
    if (!make_ray(views + (long)k * VIEW_LEN, det, grid, dims, iu, iv, r)) return;
    Scatter scatter{volume, proj[((long)k * n_v + iv) * n_u + iu] * r.delta};
    if (scatter.value != 0.f) walk_ray(r, dims, scatter);
}
HOST_ENTRY(joseph_adjoint,
           (const float* proj, float* volume, const float* views, const float* grid, int nx, int ny, int nz,
            int n_views, int n_u, int n_v, float sdd, float du, float dv, float u0, float v0, int curved),
           (proj, volume, views, grid, nx, ny, nz, n_views, n_u, n_v, sdd, du, dv, u0, v0, curved))

// Voxel-driven backprojection of filtered projections for FBP (fan) and FDK (cone): each voxel
// is projected onto every view's detector along the ray from the focal spot, the filtered
// projection is interpolated bilinearly (zero outside), and weighted by the distance weight
// (sod / depth)^2 (flat; depth along the central ray) or sod^2 / (in-plane distance)^2 (curved).
// view_weights[k] carries the angular step (and any per-view redundancy weight). Writes (not
// adds) the volume: one thread per voxel, no atomics.
extern "C" __global__ void backproject_fdk(const float* __restrict__ proj, float* __restrict__ volume,
                                           const float* __restrict__ views, const float* __restrict__ grid,
                                           const float* __restrict__ view_weights, int nx, int ny, int nz,
                                           int n_views, int n_u, int n_v, float sdd, float sod, float du,
                                           float dv, float u0, float v0, int curved) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const int j = blockIdx.y * blockDim.y + threadIdx.y;
    const int kz = blockIdx.z * blockDim.z + threadIdx.z;
    if (i >= nx || j >= ny || kz >= nz) return;
    const float x[3] = {grid[0] + i * grid[3], grid[1] + j * grid[4], grid[2] + kz * grid[5]};
    float acc = 0.f;
    for (int k = 0; k < n_views; ++k) {
        const float* vw = views + (long)k * VIEW_LEN;
        float w[3];
        for (int a = 0; a < 3; ++a) w[a] = x[a] - vw[a];
        const float wd = w[0] * vw[3] + w[1] * vw[4] + w[2] * vw[5];
        const float wu = w[0] * vw[6] + w[1] * vw[7] + w[2] * vw[8];
        const float wv = w[0] * vw[9] + w[1] * vw[10] + w[2] * vw[11];
        float fu, fv, weight;
        if (curved) {
            const float r2 = wd * wd + wu * wu;
            if (wd <= 0.f || r2 <= 0.f) continue;
            fu = atan2f(wu, wd) * sdd / du + u0;
            fv = wv * sdd * rsqrtf(r2) / dv + v0;
            weight = sod * sod / r2;
        } else {
            if (wd <= 0.f) continue;
            const float mag = sdd / wd;
            fu = wu * mag / du + u0;
            fv = wv * mag / dv + v0;
            weight = (sod / wd) * (sod / wd);
        }
        const float gu = floorf(fu), gv = floorf(fv);
        const int iu = (int)gu, iv = (int)gv;
        const float au = fu - gu, av = fv - gv;
        const float* pk = proj + (long)k * n_v * n_u;
        float sample = 0.f;
        for (int ov = 0; ov < 2; ++ov) {
            const int jv = iv + ov;
            if (jv < 0 || jv >= n_v) continue;
            for (int ou = 0; ou < 2; ++ou) {
                const int ju = iu + ou;
                if (ju < 0 || ju >= n_u) continue;
                sample += (ou ? au : 1.f - au) * (ov ? av : 1.f - av) * ldg(pk + (long)jv * n_u + ju);
            }
        }
        acc += view_weights[k] * weight * sample;
    }
    volume[((long)kz * ny + j) * nx + i] = acc;
}
HOST_ENTRY(backproject_fdk,
           (const float* proj, float* volume, const float* views, const float* grid, const float* view_weights,
            int nx, int ny, int nz, int n_views, int n_u, int n_v, float sdd, float sod, float du, float dv,
            float u0, float v0, int curved),
           (proj, volume, views, grid, view_weights, nx, ny, nz, n_views, n_u, n_v, sdd, sod, du, dv, u0, v0,
            curved))
