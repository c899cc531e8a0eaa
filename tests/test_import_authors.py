"""``diffiml import-authors``: checkpoints of the authors' code (IMDLBenCo, scu-zjz/DiffIML) import exactly.

No code of the authors runs here. Their checkpoints are made from our own models by this file's inverse mapping
(``to_authors``), checked against ``fixtures/authors-state-dict.json``: the names and shapes of all 730 tensors of
their model, listed from their code with random weights."""

import argparse
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from diffiml.cli import main
from diffiml.export.exporter import load_diffiml
from diffiml.train.authors_mapping import MIT_LAYOUTS, authors_to_ours, mit_rules
from diffiml.train.config import get_config
from diffiml.train.model import DiffIML

FIXTURE = Path(__file__).parent / "fixtures" / "authors-state-dict.json"

# Our MiT block parts (transformers 5 and 4 names) -> theirs; "kv#k" / "kv#v": the halves of their fused kv.
BLOCK_PARTS = {
    "layernorm_before": "norm1", "layer_norm_1": "norm1", "layernorm_after": "norm2", "layer_norm_2": "norm2",
    "attention.q_proj": "attn.q", "attention.self.query": "attn.q", "attention.k_proj": "attn.kv#k",
    "attention.self.key": "attn.kv#k", "attention.v_proj": "attn.kv#v", "attention.self.value": "attn.kv#v",
    "attention.o_proj": "attn.proj", "attention.output.dense": "attn.proj",
    "attention.sequence_reduction.sequence_reduction": "attn.sr", "attention.self.sr": "attn.sr",
    "attention.sequence_reduction.layer_norm": "attn.norm", "attention.self.layer_norm": "attn.norm",
    "mlp.fc1": "mlp.fc1", "mlp.dense1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "mlp.dense2": "mlp.fc2",
    "mlp.dwconv.dwconv": "mlp.dwconv.dwconv",
}
RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "time_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
                "skip": "conv_shortcut"}
UNET_PARTS = {"time_mlp.0": "time_embedding.linear_1", "time_mlp.2": "time_embedding.linear_2", "conv_in": "conv_in",
              "mid1": "mid_block.resnets.0", "mid2": "mid_block.resnets.1", "mid_attn.norm":
              "mid_block.attentions.0.group_norm", "mid_attn.out": "mid_block.attentions.0.to_out.0",
              "norm_out": "conv_norm_out", "conv_out": "conv_out"}
VAE_ENCODER = {"0.0": 0, "0.1": 1, "1.0": 3, "1.1": 4, "2.0": 6, "2.1": 7, "3": 9}
VAE_DECODER = {"0": 0, "1.0": 1, "1.2": 3, "2.0": 4, "2.2": 6, "3.0": 7, "3.2": 9, "4": 10, "6": 12}


def _their_name(key: str) -> str:
    """One of our names -> theirs (the fused and split tensors are handled by ``to_authors``)."""
    mit = r"encoder\.backbone\.(?:stages\.(\d)\.|encoder\.)"
    if m := re.fullmatch(mit + r"(?:blocks\.|block\.(\d)\.)(\d+)\.(.+)\.(weight|bias)", key):
        stage = int(m[1] or m[2]) + 1
        return f"extractor.backbone.block{stage}.{m[3]}.{BLOCK_PARTS[m[4]]}.{m[5]}"
    if m := re.fullmatch(mit + r"patch_embeddings\.(?:(\d)\.)?(proj|layer_norm)\.(weight|bias)", key):
        part = "proj" if m[3] == "proj" else "norm"
        return f"extractor.backbone.patch_embed{int(m[1] or m[2]) + 1}.{part}.{m[4]}"
    if m := re.fullmatch(mit + r"layer_norm\.(?:(\d)\.)?(weight|bias)", key):
        return f"extractor.backbone.norm{int(m[1] or m[2]) + 1}.{m[3]}"
    if m := re.fullmatch(r"encoder\.stage_proj\.(\d)\.(.+)", key):
        return f"extractor.linear_c{int(m[1]) + 1}.{m[2]}"
    if m := re.fullmatch(r"encoder\.fuse\.(.+)", key):
        return f"extractor.linear_fuse.{m[1]}"
    if m := re.fullmatch(r"unet\.(down|up)\.(\d+)\.(\w+)\.(.+)", key):
        return f"unet.unet.{m[1]}_blocks.0.resnets.{m[2]}.{RESNET_PARTS[m[3]]}.{m[4]}"
    if m := re.fullmatch(r"unet\.(mid[12])\.(\w+)\.(.+)", key):
        return f"unet.unet.{UNET_PARTS[m[1]]}.{RESNET_PARTS[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"unet\.(.+)\.(weight|bias)", key):
        return f"unet.unet.{UNET_PARTS[m[1]]}.{m[2]}"
    if m := re.fullmatch(r"vae\.(encoder|decoder)\.([\d.]+?)\.(weight|bias|running_mean|running_var|"
                         r"num_batches_tracked)", key):
        index = (VAE_ENCODER if m[1] == "encoder" else VAE_DECODER)[m[2]]
        return f"vae.{m[1]}.{index}.{m[3]}"
    raise AssertionError(f"no authors' name for {key}")


def to_authors(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict written in the authors' naming: the inverse of the importer, written independently."""
    theirs: dict[str, torch.Tensor] = {}
    kv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in ours.items():
        if key in ("unet.latent_entry.weight", "unet.condition_entry.weight"):
            continue
        if key.startswith("unet.mid_attn.qkv."):
            for p, part in zip("qkv", value.chunk(3), strict=True):
                theirs[f"unet.unet.mid_block.attentions.0.to_{p}.{key.rsplit('.', 1)[1]}"] = part.clone()
            continue
        name = _their_name(key)
        if m := re.fullmatch(r"(.+)#([kv])(\..+)", name):
            kv.setdefault(m[1] + m[3], {})[m[2]] = value
        else:
            theirs[name] = value
    theirs.update({name: torch.cat([parts["k"], parts["v"]]) for name, parts in kv.items()})
    theirs["unet.concat.weight"] = torch.cat([ours["unet.latent_entry.weight"], ours["unet.condition_entry.weight"]], 1)
    return theirs


# The tiny config as the authors' code would build it: diffusers' GroupNorm 32, no self-correlation.
TINY = dataclasses.replace(get_config("tiny"), name="authors", unet_groups=32, self_correlation=False,
                           correlation_topk=8, steps=8, ensemble=5)


def _perturbed(model: DiffIML) -> DiffIML:
    """Every tensor its own values (norms start out alike, so a swap of two would not show otherwise)."""
    with torch.no_grad():
        for i, (key, value) in enumerate(model.state_dict().items()):
            if value.is_floating_point():
                value.add_(torch.randn_like(value) * 0.02)
            elif key.endswith("num_batches_tracked"):
                value.fill_(i)
    return model.eval()


def _save_authors(path: Path, state: dict, prefix: str = "", **args) -> Path:
    """A file as IMDLBenCo's trainer writes it (under DDP with ``prefix="module."``)."""
    torch.save({"model": {prefix + k: v for k, v in state.items()}, "epoch": 3, "scaler": {"scale": 65536.0},
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "fused": None}]},
                "args": argparse.Namespace(model="DiffIML", output_dir="./output_dir", **args)}, path)
    return path


def _outputs(model: DiffIML, image_size: int) -> tuple[torch.Tensor, ...]:
    """Encoder, one UNet call and the decoder on fixed inputs (the UNet and decoder on a small grid: they are
    convolutional, and the paper model's full grid would only cost time)."""
    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, image_size, image_size, generator=g)
    z = torch.randn(2, 8, 8, 8, generator=g)
    cond = torch.randn(1, model.config.head_channels, 8, 8, generator=g)
    with torch.no_grad():
        return (model.encoder(image), model.unet(z, torch.tensor([875, 125]), model.unet.condition_features(cond)),
                model.vae.decode(z[:, :4]))


def _assert_same_model(imported: DiffIML, original: DiffIML, image_size: int) -> None:
    mine = imported.state_dict()
    assert set(mine) == set(original.state_dict())
    for key, value in original.state_dict().items():
        assert torch.equal(mine[key], value), key
    for got, want in zip(_outputs(imported, image_size), _outputs(original, image_size), strict=True):
        assert torch.equal(got, want)


@pytest.fixture(scope="module")
def tiny_model() -> DiffIML:
    torch.manual_seed(0)
    return _perturbed(DiffIML(TINY))


def _meta(listed: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta", dtype=torch.long if k.endswith("num_batches_tracked") else None)
            for k, shape in listed.items()}


def test_this_files_inverse_mapping_gives_the_authors_names_and_shapes():
    listed = json.loads(FIXTURE.read_text())
    with torch.device("meta"):
        written = to_authors(DiffIML(get_config("paper")).state_dict())
    assert {k: list(v.shape) for k, v in written.items()} == listed


def test_importer_covers_every_name_and_shape_of_the_authors_model():
    listed = json.loads(FIXTURE.read_text())
    assert len(listed) == 730
    config, ours, _ = authors_to_ours(_meta(listed))  # refuses any of their tensors it does not use
    assert config == get_config("paper")
    with torch.device("meta"):
        reference = DiffIML(config).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.items()}


def test_paper_model_in_the_authors_format_round_trips_exactly(tmp_path):
    from diffiml.train.import_authors import import_authors

    torch.manual_seed(0)
    model = _perturbed(DiffIML(get_config("paper")))
    source = _save_authors(tmp_path / "checkpoint-149.pth", to_authors(model.state_dict()), image_size=512)
    summary = import_authors(source, tmp_path / "run")
    assert (summary["config"], summary["tensors"], summary["authors_tensors"]) == ("paper", 783, 730)
    imported, _ = load_diffiml(tmp_path / "run")  # what `diffiml export` loads
    assert imported.config == get_config("paper")
    _assert_same_model(imported, model, image_size=64)


def test_a_ddp_checkpoint_imports_through_the_command_line(tiny_model, tmp_path, capsys):
    source = _save_authors(tmp_path / "ckpt.pth", to_authors(tiny_model.state_dict()), "module.", image_size=64)
    assert main(["import-authors", str(source), "--out", str(tmp_path / "run")]) == 0
    summary = json.loads(capsys.readouterr().out)
    imported, ckpt = load_diffiml(tmp_path / "run")
    assert imported.config == TINY and summary["backbone"] == "tiny"
    _assert_same_model(imported, tiny_model, image_size=64)
    stored = json.loads((ckpt / "config.json").read_text())["imported_from"]
    assert stored["file"] == "ckpt.pth" and stored["epoch"] == 3 and len(stored["sha256"]) == 64
    assert main(["import-authors", str(source), "--out", str(tmp_path / "run")]) == 2  # never over a checkpoint


def test_old_diffusers_attention_names_import_alike(tiny_model):
    state = to_authors(tiny_model.state_dict())
    old_names = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    old = {re.sub(r"\.to_(q|k|v|out\.0)\.", lambda m: old_names[m[0]], k): v for k, v in state.items()}
    assert old.keys() != state.keys()
    _, want, _ = authors_to_ours(state, {"image_size": 64})
    _, got, _ = authors_to_ours(old, {"image_size": 64})
    assert all(torch.equal(got[k], v) for k, v in want.items())


def test_transformers_4_names_are_those_transformers_5_renames():
    conversion = pytest.importorskip("transformers.conversion_mapping")
    renames = conversion.get_checkpoint_conversion_mapping("SegformerModel")
    if not renames:
        pytest.skip("this transformers has no renaming of Segformer's weights")

    def rename(key: str) -> str:
        for rule in renames:
            for source, target in zip(rule.source_patterns, rule.target_patterns, strict=True):
                key = re.sub(source, target, key)
        return key

    config = get_config("paper")
    old = {r.ours.removeprefix("encoder.backbone.") for r in mit_rules(config, MIT_LAYOUTS["transformers 4"])}
    new = {r.ours.removeprefix("encoder.backbone.") for r in mit_rules(config, MIT_LAYOUTS["transformers 5"])}
    assert {rename(k) for k in old} == new


def _refused(capsys, tmp_path: Path, source: Path) -> str:
    """The command's one line for ``source``; nothing written."""
    capsys.readouterr()
    assert main(["import-authors", str(source), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()
    line = err.strip().splitlines()[-1]
    assert line.startswith("diffiml import-authors: error: ") and str(source) in line
    return line


def test_refuses_a_groupnorm_lightvae(tiny_model, tmp_path, capsys):
    state = {k: v for k, v in to_authors(tiny_model.state_dict()).items()
             if not (k.startswith("vae.") and re.search(r"running_|num_batches", k))}
    assert "GroupNorm" in _refused(capsys, tmp_path, _save_authors(tmp_path / "c.pth", state, image_size=64))


def test_refuses_a_silu_lightvae_named_in_its_args(tiny_model, tmp_path, capsys):
    source = _save_authors(tmp_path / "c.pth", to_authors(tiny_model.state_dict()), image_size=64,
                           activation_fn_name="silu")
    assert "silu" in _refused(capsys, tmp_path, source)


def test_refuses_a_backbone_that_is_not_a_mit(tiny_model, tmp_path, capsys):
    state = {k: v for k, v in to_authors(tiny_model.state_dict()).items() if not k.startswith("extractor.backbone.")}
    state["extractor.backbone.conv1.weight"] = torch.zeros(64, 3, 7, 7)
    assert "not a MiT" in _refused(capsys, tmp_path, _save_authors(tmp_path / "c.pth", state, image_size=64))


def test_refuses_a_mit_depth_we_have_no_variant_for(tiny_model, tmp_path, capsys):
    state = to_authors(tiny_model.state_dict())
    state.update({k.replace("block1.0.", "block1.1."): v for k, v in state.items() if ".block1.0." in k})
    assert "none of our variants" in _refused(capsys, tmp_path, _save_authors(tmp_path / "c.pth", state))


def test_refuses_missing_and_unknown_tensors_by_name(tiny_model, tmp_path, capsys):
    state = to_authors(tiny_model.state_dict())
    del state["unet.concat.weight"]
    state["unet.extra.weight"] = torch.zeros(1)
    line = _refused(capsys, tmp_path, _save_authors(tmp_path / "c.pth", state, image_size=64))
    assert "missing unet.concat.weight" in line and "unknown unet.extra.weight" in line


class _RunsCode:
    """A pickle that would create a file if it were ever unpickled in full."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_refuses_a_pickle_that_is_not_a_tensor_dict_without_running_it(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    torch.save({"model": _RunsCode(marker)}, tmp_path / "c.pth")
    assert "never unpickled" in _refused(capsys, tmp_path, tmp_path / "c.pth")
    assert not marker.exists()
    torch.save({"model": {"weight": [1.0, 2.0]}}, tmp_path / "plain.pth")
    assert "no state dict of tensors" in _refused(capsys, tmp_path, tmp_path / "plain.pth")


def test_refuses_a_truncated_file(tiny_model, tmp_path, capsys):
    source = _save_authors(tmp_path / "c.pth", to_authors(tiny_model.state_dict()), image_size=64)
    source.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    assert "truncated or corrupt" in _refused(capsys, tmp_path, source)
