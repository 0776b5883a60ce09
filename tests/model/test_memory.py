"""Packed weights gathered into one huge-page arena (model/memory.py): the same values, the same sharing between
fused layers and their parts, on 2 MiB-aligned memory the kernel was asked to back with huge pages."""

from pathlib import Path

import pytest
import torch

from model.checkpoint.gguf import gguf_packed_weights
from model.loading import load
from model.memory import HUGE_PAGE, gather_on_huge_pages, huge_page_buffer
from model.paths import default_gguf_path
from model.quant import PackedLinear, fuse

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
BUFFERS = ("codes", "high", "scales", "sub")


def vma_flags(address: int) -> set[str]:
    """The VmFlags of the mapping that holds `address`, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(a, 16) for a in head.split("-"))
            inside = start <= address < end
        elif inside and head == "VmFlags:":
            return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


def huge_pages_possible() -> bool:
    return THP.is_file() and "[never]" not in THP.read_text()


@pytest.mark.skipif(not huge_pages_possible(), reason="transparent huge pages are off or absent here")
def test_the_arena_starts_on_a_huge_page_and_is_advised_for_huge_pages():
    buffer, advised = huge_page_buffer(5 * HUGE_PAGE + 123)
    assert advised
    assert buffer.data_ptr() % HUGE_PAGE == 0 and buffer.numel() == 5 * HUGE_PAGE + 123
    assert "hg" in vma_flags(buffer.data_ptr())


def test_gathered_layers_keep_their_values_and_their_shared_storage():
    weights = dict(gguf_packed_weights(default_gguf_path()))
    layers = [PackedLinear.from_weight(weights[f"model.layers.0.self_attn.{p}_proj.weight"]) for p in "qkv"]
    layers += [PackedLinear.from_weight(weights["model.layers.0.mlp.down_proj.weight"])]
    fused = fuse(layers[:3])
    modules = [fused, *layers]
    x = torch.randn(5, 576).to(torch.bfloat16)
    before = fused(x)
    saved = {(i, n): getattr(m, n).clone() for i, m in enumerate(modules) for n in BUFFERS}
    total = gather_on_huge_pages(modules, BUFFERS)
    assert total >= sum(m.nbytes for m in (fused, layers[3]))
    for (i, name), value in saved.items():
        assert torch.equal(getattr(modules[i], name), value), (i, name)
    # one arena: every buffer's bytes lie inside it, and q, k, v are still views of the fused layer's codes
    pointers = [getattr(m, n).data_ptr() for m in modules for n in BUFFERS if getattr(m, n).numel()]
    assert max(pointers) - min(pointers) < total
    assert layers[1].codes.data_ptr() == fused.codes[layers[0].codes.shape[0]:].data_ptr()
    assert torch.equal(fused(x), torch.cat([layer(x) for layer in layers[:3]], dim=1))
    assert torch.equal(fused(x), before)


@pytest.mark.skipif(not huge_pages_possible(), reason="transparent huge pages are off or absent here")
def test_a_loaded_model_serves_its_packed_weights_from_huge_page_memory():
    model = load(quantization="auto").model
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert packed
    for m in packed:
        assert "hg" in vma_flags(m.codes.data_ptr())


GATHER_PEAK = """
import torch
from torch import nn
from model.memory import gather_on_huge_pages

def resident(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key)) * 1024

modules = []
for i in range(16):  # 256 MiB in 16 storages, each filled (so resident)
    m = nn.Module()
    m.register_buffer("codes", torch.full((16 << 20,), i, dtype=torch.uint8))
    modules.append(m)
before = resident("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # the high-water mark starts again from here
gather_on_huge_pages(modules, ("codes",))
assert all(int(m.codes[0]) == i and int(m.codes[-1]) == i for i, m in enumerate(modules))
print(resident("VmHWM") - before)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc")
def test_gathering_lets_each_buffer_go_once_copied_so_it_needs_little_more_memory_than_the_weights():
    """Copying every buffer before letting any go needed twice the weights at the peak (a 1B model's load peaked
    near 2.5 times its weights); each is now freed once copied, the heap trimmed as it goes."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", GATHER_PEAK], cwd=root, capture_output=True, text=True, check=True)
    growth = int(out.stdout.split()[-1])
    assert growth < 128 << 20, f"gathering 256 MiB raised the peak by {growth / 2**20:.0f} MiB"
