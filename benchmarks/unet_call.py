"""``diffiml bench unet-call``: one UNet call, every way it can run, in one process.

Explains the Table 4 rows: our UNet in PyTorch against a diffusers ``UNet2DModel`` of the same configuration (the
authors' UNet class, so our ``torch-authors`` row is a fair stand-in), and the exported UNet step in onnxruntime with
the fused attention operator against plain MatMul/Softmax (``diffiml export --attention``). Random weights.
"""

from __future__ import annotations

from typing import Any

from diffiml.benchmarks.table4 import time_runs


def bench_unet_call(config_name: str, members: int, runs: int, warmup: int,
                    attentions: tuple[str, ...] = ("fused", "standard")) -> list[dict[str, Any]]:
    import torch

    from diffiml.export.exporter import export_graph
    from diffiml.export.graphs import graph_specs
    from diffiml.runtime.backends.ort_backend import ort_module, session_options
    from diffiml.train.config import get_config
    from diffiml.train.model import DiffIML

    config = get_config(config_name)
    torch.manual_seed(0)
    model = DiffIML(config).eval()
    h = config.latent_size
    z, t = torch.randn(members, 8, h, h), torch.full((members,), 500)
    cond = model.unet.condition_features(torch.randn(1, config.head_channels, h, h)).detach()
    rows: list[dict[str, Any]] = []

    def add(name: str, fn: Any) -> None:
        def call() -> None:  # time_runs takes stage timings or None; one call has no stages
            fn()

        timing = time_runs(call, runs, warmup)
        rows.append({"implementation": name, "members": members, "image_size": config.image_size,
                     "latency_ms_p50": timing["latency_ms_p50"], "latency_ms_p90": timing["latency_ms_p90"]})

    with torch.no_grad():
        add("torch: diffiml UNet (scaled_dot_product_attention)", lambda: model.unet(z, t, cond))
        try:
            from diffusers import UNet2DModel
        except ImportError:
            rows.append({"implementation": "torch: diffusers UNet2DModel", "skipped": "diffusers is not installed"})
        else:
            reference = UNet2DModel(
                sample_size=h, in_channels=8, out_channels=8, block_out_channels=(config.unet_channels,),
                down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
                layers_per_block=config.unet_layers_per_block, attention_head_dim=config.unet_head_dim,
                norm_num_groups=config.unet_groups).eval()
            add("torch: diffusers UNet2DModel, same configuration", lambda: reference(z, t).sample)
    spec, module = graph_specs(model)["unet"]
    sizes = {"images": 1, "members": members}
    feeds = {k: v.numpy() for k, v in spec.sample_inputs(sizes).items()}
    for attention in attentions:
        session = ort_module().InferenceSession(export_graph(spec, module, {"images": 2, "members": 4}, attention),
                                                sess_options=session_options(), providers=["CPUExecutionProvider"])
        add(f"onnxruntime CPU: UNet step, --attention {attention}", lambda s=session: s.run(None, feeds))
    return rows


def to_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| implementation | members | input | p50 ms | p90 ms |", "|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['implementation']} | - | - | skipped: {r['skipped']} | - |")
        else:
            lines.append(f"| {r['implementation']} | {r['members']} | {r['image_size']}² | {r['latency_ms_p50']} | "
                         f"{r['latency_ms_p90']} |")
    return "\n".join(lines) + "\n"

