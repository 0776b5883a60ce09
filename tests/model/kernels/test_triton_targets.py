"""Every Triton kernel of the project compiles to a cubin for the GPUs we serve on (sm_90: H100/H200; sm_80: A100),
without a GPU: Triton's compiler and its bundled ptxas run on the CPU. A kernel that would not build on the device
fails here, not at its first request there.

The compiler runs in a subprocess: this test session runs Triton kernels in its interpreter (tests/conftest.py),
which changes how `triton.language` behaves in the whole process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[3]
ARCHS = (90, 80)
CACHE_STRIDES = ("stride_cb", "stride_ch", "stride_cs", "stride_tb")
STRIDES = ("stride_qb", "stride_qh", *CACHE_STRIDES, "stride_ob", "stride_oh")
WRITE_STRIDES = ("stride_kb", "stride_kh", "stride_vb", "stride_vh", *CACHE_STRIDES)
# (dtype, query heads per KV head, splits): bf16 on the tensor cores (tf32 or better), float32 in IEEE precision;
# one split, or several that _merge_splits combines
DECODE_CASES = [(dtype, group, splits) for dtype in ("bf16", "fp32") for group, splits in ((1, 1), (4, 1), (8, 4))]


def cases() -> dict[str, tuple]:
    """case id -> (kernel name, signature, constants, arch), as paged_decode_attention launches the kernels."""
    from model.kernels import triton_decode

    out = {}
    for arch in ARCHS:
        for dtype, group, splits in DECODE_CASES:
            signature = {name: f"*{dtype}" for name in ("Q", "KC", "VC", "O")}
            signature.update({"T": "*i64", "PO": "*fp32", "PML": "*fp32", **dict.fromkeys(STRIDES, "i64"),
                              "scale": "fp32"})
            constants = dict(G=group, GP=max(16, triton.next_power_of_2(group)), D=64 if group < 8 else 128, S=16,
                             BN=triton_decode.BLOCK_N, SPLIT=triton_decode.MIN_SPLIT, SPLITS=splits,
                             PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST=False)
            out[f"paged_decode-{dtype}-g{group}-s{splits}-sm_{arch}"] = ("_paged_decode", signature, constants, arch)
        for dtype in ("bf16", "fp32"):
            signature = {**{name: f"*{dtype}" for name in ("K", "V", "KC", "VC")}, "T": "*i64",
                         **dict.fromkeys(WRITE_STRIDES, "i64")}
            out[f"write_new_kv-{dtype}-sm_{arch}"] = ("_write_new_kv", signature, dict(D=64, S=16), arch)
        out[f"merge_splits-sm_{arch}"] = ("_merge_splits", {
            "PO": "*fp32", "PML": "*fp32", "O": "*bf16", "stride_ob": "i64", "stride_oh": "i64", "H": "i32"},
            dict(D=128, SPLITS=4, SP=4), arch)
    return out


def main() -> None:
    """Compile every case; print {case: {"cubin": bytes, "ptx_target": ...} or {"error": ...}} as JSON."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from model.kernels import triton_decode

    results = {}
    for case, (name, signature, constants, arch) in cases().items():
        signature = {**signature, **dict.fromkeys(constants, "constexpr")}
        try:
            kernel = triton.compile(ASTSource(getattr(triton_decode, name), signature, constexprs=constants),
                                    target=GPUTarget("cuda", arch, 32))
            results[case] = {"cubin": len(kernel.asm["cubin"]), "ptx_target": f".target sm_{arch}" in kernel.asm["ptx"]}
        except Exception as e:  # noqa: BLE001 - reported per case
            results[case] = {"error": f"{type(e).__name__}: {e}"[-2000:]}
    print(json.dumps(results))


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", "from tests.model.kernels.test_triton_targets import main; main()"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(cases()))
def test_kernel_compiles_for_the_gpu(compiled, case):
    result = compiled[case]
    assert "error" not in result, result.get("error")
    assert result["cubin"] > 0 and result["ptx_target"]


def test_every_triton_kernel_is_covered():
    """A new @triton.jit kernel in the project must be added to the cases above."""
    found = {str(path.relative_to(ROOT)) for folder in ("model", "server", "bench")
             for path in (ROOT / folder).rglob("*.py") if "@triton.jit" in path.read_text()}
    assert found == {"model/kernels/triton_decode.py"}
    from model.kernels import triton_decode

    kernels = {name for name, obj in vars(triton_decode).items()
               if isinstance(obj, (triton.runtime.JITFunction, triton.runtime.interpreter.InterpretedFunction))}
    assert kernels == {name for name, *_ in cases().values()}
