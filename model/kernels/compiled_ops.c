/* The custom ops' entry points for Inductor's C++ wrapper, so that a compiled decode step calls the kernels of
 * packed_linear.c, decode_attention.c and elementwise.c directly instead of going back into Python for each call
 * (about 300 calls a step on the default model, ~20 us each).
 *
 * Inductor names an op `ns::name`'s entry point aoti_torch_cpu_<name> and passes it tensors as handles of
 * PyTorch's stable C ABI (the aoti_torch_* functions of libtorch, declared below rather than through its C++
 * headers), scalars as int64_t, and the output as a handle to fill. Each function returns 0 on success; anything
 * else makes the compiled step raise. They check what the Python entry points check (model/kernels/cpu.py,
 * model/quant.py) and copy strided inputs to contiguous scratch as they would.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct AtenTensorOpaque *AtenTensorHandle;
typedef int32_t AOTITorchError;

extern AOTITorchError aoti_torch_get_data_ptr(AtenTensorHandle t, void **ret);
extern AOTITorchError aoti_torch_get_dim(AtenTensorHandle t, int64_t *ret);
extern AOTITorchError aoti_torch_get_sizes(AtenTensorHandle t, int64_t **ret);
extern AOTITorchError aoti_torch_get_strides(AtenTensorHandle t, int64_t **ret);
extern AOTITorchError aoti_torch_get_numel(AtenTensorHandle t, int64_t *ret);
extern AOTITorchError aoti_torch_get_dtype(AtenTensorHandle t, int32_t *ret);
extern AOTITorchError aoti_torch_empty_strided(int64_t ndim, const int64_t *sizes, const int64_t *strides,
                                               int32_t dtype, int32_t device_type, int32_t device_index,
                                               AtenTensorHandle *ret);
extern int32_t aoti_torch_dtype_bfloat16(void);
extern int32_t aoti_torch_dtype_float32(void);
extern int32_t aoti_torch_device_type_cpu(void);

int packed_linear(const uint16_t *x, int64_t M, int64_t K, int64_t N, int bits, int kind, const void *codes,
                  const uint32_t *high, const uint16_t *scales, const uint8_t *sub, void *out, int out_float);
void decode_attention_bf16(const void *q, const void *k_new, const void *v_new, void *k, void *v, void *out,
                           const int64_t *host, int64_t W, int64_t B, int64_t Hkv, int64_t G, int64_t D, int64_t S,
                           int64_t block_stride, int64_t head_stride, float scale);
void decode_attention_f32(const void *q, const void *k_new, const void *v_new, void *k, void *v, void *out,
                          const int64_t *host, int64_t W, int64_t B, int64_t Hkv, int64_t G, int64_t D, int64_t S,
                          int64_t block_stride, int64_t head_stride, float scale);
void rms_norm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *out, int64_t N, int64_t D, float eps);
void silu_mul_bf16(const uint16_t *gate_up, uint16_t *out, int64_t N, int64_t H);
void rope_bf16(const uint16_t *x, int64_t stride, const float *cos, const float *sin, uint16_t *out, int64_t N,
               int64_t heads, int64_t D);

#define CHECK(call) do { if ((call) != 0) return 1; } while (0)
#define MAX_DIM 4

typedef struct {
    int64_t dim, numel, sizes[MAX_DIM], strides[MAX_DIM];
    void *data;
} View;

static int view_of(AtenTensorHandle t, View *v) {
    int64_t *sizes, *strides;
    CHECK(aoti_torch_get_dim(t, &v->dim));
    if (v->dim > MAX_DIM) return 1;
    CHECK(aoti_torch_get_sizes(t, &sizes));
    CHECK(aoti_torch_get_strides(t, &strides));
    CHECK(aoti_torch_get_numel(t, &v->numel));
    CHECK(aoti_torch_get_data_ptr(t, &v->data));
    for (int64_t i = 0; i < v->dim; i++) v->sizes[i] = sizes[i], v->strides[i] = strides[i];
    return 0;
}

static int is_contiguous(const View *v) {
    int64_t expected = 1;
    for (int64_t i = v->dim - 1; i >= 0; i--) {
        if (v->sizes[i] != 1 && v->strides[i] != expected) return 0;
        expected *= v->sizes[i];
    }
    return 1;
}

/* v's elements in row-major order: its own data when contiguous, else a copy in *scratch (to free). */
static const void *contiguous(const View *v, size_t item, void **scratch) {
    *scratch = NULL;
    if (is_contiguous(v)) return v->data;
    char *dst = malloc((size_t)v->numel * item);
    if (dst == NULL) return NULL;
    /* row by row when the last dimension is dense (a slice of a wider tensor), else element by element */
    const int64_t last = v->dim - 1, run = v->strides[last] == 1 ? v->sizes[last] : 1;
    int64_t index[MAX_DIM] = {0};
    for (int64_t n = 0; n < v->numel; n += run) {
        int64_t offset = 0;
        for (int64_t i = 0; i < v->dim; i++) offset += index[i] * v->strides[i];
        memcpy(dst + (size_t)n * item, (const char *)v->data + offset * (int64_t)item, (size_t)run * item);
        for (int64_t i = run > 1 ? last - 1 : last; i >= 0 && ++index[i] == v->sizes[i]; i--) index[i] = 0;
    }
    *scratch = dst;
    return dst;
}

static void *data_or_null(AtenTensorHandle t) {
    int64_t numel;
    void *data;
    if (aoti_torch_get_numel(t, &numel) != 0 || numel == 0 || aoti_torch_get_data_ptr(t, &data) != 0) return NULL;
    return data;
}

/* llama3::packed_linear(Tensor x, Tensor codes, Tensor high, Tensor scales, Tensor sub, int bits, int kind,
 *                       int out_features, bool out_float) -> Tensor */
AOTITorchError aoti_torch_cpu_packed_linear(AtenTensorHandle x, AtenTensorHandle codes, AtenTensorHandle high,
                                            AtenTensorHandle scales, AtenTensorHandle sub, int64_t bits,
                                            int64_t kind, int64_t out_features, int64_t out_float,
                                            AtenTensorHandle *ret) {
    View xv;
    void *scratch, *codes_data, *scales_data, *out;
    CHECK(view_of(x, &xv));
    if (xv.dim != 2) return 1;
    const int64_t M = xv.sizes[0], K = xv.sizes[1];
    const int64_t sizes[2] = {M, out_features}, strides[2] = {out_features, 1};
    const int32_t dtype = out_float ? aoti_torch_dtype_float32() : aoti_torch_dtype_bfloat16();
    CHECK(aoti_torch_empty_strided(2, sizes, strides, dtype, aoti_torch_device_type_cpu(), 0, ret));
    CHECK(aoti_torch_get_data_ptr(*ret, &out));
    CHECK(aoti_torch_get_data_ptr(codes, &codes_data));
    CHECK(aoti_torch_get_data_ptr(scales, &scales_data));
    const void *xd = contiguous(&xv, 2, &scratch);
    if (xd == NULL) return 1;
    int status = packed_linear(xd, M, K, out_features, (int)bits, (int)kind, codes_data, data_or_null(high),
                               scales_data, data_or_null(sub), out, (int)out_float);
    free(scratch);
    return status != 0;
}

/* llama3::decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor tables,
 *                          Tensor? host, str impl) -> Tensor, for impl "sdpa" on the CPU (whoever compiles the
 * step routes only that here). q [B, H, D]; k, v [B, Hkv, D]; caches [blocks, Hkv, S, D]; host [B, W]. */
AOTITorchError aoti_torch_cpu_decode_attention(AtenTensorHandle q, AtenTensorHandle k, AtenTensorHandle v,
                                               AtenTensorHandle k_cache, AtenTensorHandle v_cache,
                                               AtenTensorHandle tables, AtenTensorHandle *host, const char *impl,
                                               AtenTensorHandle *ret) {
    View qv, kv, vv, kc, vc, hv;
    int32_t dtype;
    void *scratch[4] = {NULL, NULL, NULL, NULL}, *out;
    if (strcmp(impl, "sdpa") != 0) return 1;
    CHECK(view_of(q, &qv));
    CHECK(view_of(k, &kv));
    CHECK(view_of(v, &vv));
    CHECK(view_of(k_cache, &kc));
    CHECK(view_of(v_cache, &vc));
    CHECK(view_of(host != NULL && *host != NULL ? *host : tables, &hv));
    CHECK(aoti_torch_get_dtype(q, &dtype));
    const int bf16 = dtype == aoti_torch_dtype_bfloat16();
    if (!bf16 && dtype != aoti_torch_dtype_float32()) return 1;
    if (qv.dim != 3 || kv.dim != 3 || kc.dim != 4 || hv.dim != 2) return 1;
    const int64_t B = qv.sizes[0], H = qv.sizes[1], D = qv.sizes[2], Hkv = kv.sizes[1];
    for (int i = 0; i < 4; i++)
        if (kc.strides[i] != vc.strides[i]) return 1;
    if (kc.strides[2] != D || kc.strides[3] != 1 || H % Hkv != 0) return 1;
    const int64_t strides[3] = {H * D, D, 1};
    CHECK(aoti_torch_empty_strided(3, qv.sizes, strides, dtype, aoti_torch_device_type_cpu(), 0, ret));
    CHECK(aoti_torch_get_data_ptr(*ret, &out));
    const size_t item = bf16 ? 2 : 4;
    const void *qd = contiguous(&qv, item, &scratch[0]), *kd = contiguous(&kv, item, &scratch[1]);
    const void *vd = contiguous(&vv, item, &scratch[2]), *hd = contiguous(&hv, 8, &scratch[3]);
    int status = 1;
    if (qd != NULL && kd != NULL && vd != NULL && hd != NULL) {
        (bf16 ? decode_attention_bf16 : decode_attention_f32)(qd, kd, vd, kc.data, vc.data, out, hd, hv.sizes[1], B,
                                                              Hkv, H / Hkv, D, kc.sizes[2], kc.strides[0],
                                                              kc.strides[1], (float)pow((double)D, -0.5));
        status = 0;
    }
    for (int i = 0; i < 4; i++) free(scratch[i]);
    return status;
}

/* A new bfloat16 tensor of v's sizes, contiguous. */
static int empty_bf16(const View *v, AtenTensorHandle *ret, void **data) {
    int64_t strides[MAX_DIM], stride = 1;
    for (int64_t i = v->dim - 1; i >= 0; i--) strides[i] = stride, stride *= v->sizes[i];
    CHECK(aoti_torch_empty_strided(v->dim, v->sizes, strides, aoti_torch_dtype_bfloat16(),
                                   aoti_torch_device_type_cpu(), 0, ret));
    return aoti_torch_get_data_ptr(*ret, data);
}

static int is_bf16(AtenTensorHandle t) {
    int32_t dtype;
    return aoti_torch_get_dtype(t, &dtype) == 0 && dtype == aoti_torch_dtype_bfloat16();
}

/* llama3::rms_norm(Tensor x, Tensor weight, float eps) -> Tensor; x [N, D], weight [D], bfloat16. */
AOTITorchError aoti_torch_cpu_rms_norm(AtenTensorHandle x, AtenTensorHandle weight, double eps, AtenTensorHandle *ret) {
    View xv, wv;
    void *scratch[2] = {NULL, NULL}, *out;
    CHECK(view_of(x, &xv));
    CHECK(view_of(weight, &wv));
    if (xv.dim != 2 || wv.dim != 1 || wv.sizes[0] != xv.sizes[1] || !is_bf16(x) || !is_bf16(weight)) return 1;
    CHECK(empty_bf16(&xv, ret, &out));
    const void *xd = contiguous(&xv, 2, &scratch[0]), *wd = contiguous(&wv, 2, &scratch[1]);
    const int status = xd == NULL || wd == NULL;
    if (!status) rms_norm_bf16(xd, wd, out, xv.sizes[0], xv.sizes[1], (float)eps);
    free(scratch[0]);
    free(scratch[1]);
    return status;
}

/* llama3::silu_mul(Tensor gate_up) -> Tensor; gate_up [N, 2H] bfloat16 -> [N, H]. */
AOTITorchError aoti_torch_cpu_silu_mul(AtenTensorHandle gate_up, AtenTensorHandle *ret) {
    View gv;
    void *scratch, *out;
    CHECK(view_of(gate_up, &gv));
    if (gv.dim != 2 || gv.sizes[1] % 2 != 0 || !is_bf16(gate_up)) return 1;
    View half = gv;
    half.sizes[1] /= 2;
    CHECK(empty_bf16(&half, ret, &out));
    const void *gd = contiguous(&gv, 2, &scratch);
    if (gd == NULL) return 1;
    silu_mul_bf16(gd, out, gv.sizes[0], half.sizes[1]);
    free(scratch);
    return 0;
}

/* llama3::rope(Tensor x, Tensor cos, Tensor sin) -> Tensor; x [N, heads, D] bfloat16 whose heads are contiguous
 * (its rows may lie further apart: a slice of the fused q/k/v output), cos and sin [N, D / 2] float32. */
AOTITorchError aoti_torch_cpu_rope(AtenTensorHandle x, AtenTensorHandle cos, AtenTensorHandle sin,
                                   AtenTensorHandle *ret) {
    View xv, cv, sv;
    void *scratch[3] = {NULL, NULL, NULL}, *out;
    int32_t dtype;
    CHECK(view_of(x, &xv));
    CHECK(view_of(cos, &cv));
    CHECK(view_of(sin, &sv));
    CHECK(aoti_torch_get_dtype(cos, &dtype));
    if (xv.dim != 3 || cv.dim != 2 || sv.dim != 2 || !is_bf16(x) || dtype != aoti_torch_dtype_float32()) return 1;
    const int64_t N = xv.sizes[0], heads = xv.sizes[1], D = xv.sizes[2];
    if (D % 2 != 0 || cv.sizes[0] != N || cv.sizes[1] != D / 2 || sv.sizes[0] != N || sv.sizes[1] != D / 2) return 1;
    CHECK(empty_bf16(&xv, ret, &out));
    const int heads_dense = xv.strides[2] == 1 && (xv.strides[1] == D || heads == 1);
    const void *xd = heads_dense ? xv.data : contiguous(&xv, 2, &scratch[0]);
    const int64_t stride = heads_dense ? xv.strides[0] : heads * D;
    const void *cd = contiguous(&cv, 4, &scratch[1]), *sd = contiguous(&sv, 4, &scratch[2]);
    const int status = xd == NULL || cd == NULL || sd == NULL;
    if (!status) rope_bf16(xd, stride, cd, sd, out, N, heads, D);
    for (int i = 0; i < 3; i++) free(scratch[i]);
    return status;
}
