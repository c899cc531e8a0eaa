"""The engine bundle: the one contract between export and runtime (documented in ``engines/README.md``).

A folder with ``manifest.json`` and the graph files it lists. ``load_bundle`` validates the manifest and the sha256
of every file before anything is handed to an inference engine.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffiml.files import sha256_of
from diffiml.runtime.copy_move import CopyMoveCue
from diffiml.runtime.detector import Detector
from diffiml.runtime.errors import BundleError
from diffiml.schedule import DdimPlan

# 6: optional distilled UNet graphs (`graphs["unet_kK"]`), named by the schedule they run (`schedules[K]["unet"]`);
# 5: optional `detector` (runtime/detector.py), the cue's `residual_threshold`; 4: optional `copy_move_cue`
# (runtime/copy_move.py); 3: optional reduced-precision graphs (`precisions`); 2: graphs list their operator domains.
# Versions 3 and 4 are read too: they have no detector (the score is the map's top pixels), 3 no copy-move cue.
FORMAT_VERSION = 6
READABLE_VERSIONS = (3, 4, 5, 6)
PRECISIONS = ("fp32", "int8", "fp16")
GRAPH_NAMES = ("condition_encoder", "unet", "mask_decoder")
SCHEDULE_KEYS = ("timesteps", "coef_x0", "coef_xt", "sqrt_alpha")
TEACHER_UNET = "unet"


def student_graph_name(steps: int) -> str:
    """The graph name of a UNet distilled for ``steps`` steps (e.g. ``unet_k2``)."""
    return f"{TEACHER_UNET}_k{steps}"

# The tensors the runtime feeds and reads, per graph (inputs, outputs); a bundle naming others is refused.
GRAPH_IO = {
    "condition_encoder": (("image",), ("cond_features",)),
    "unet": (("latents", "cond_features", "timestep", "coef_x0", "coef_xt", "sqrt_alpha"), ("next_latents",)),
    "mask_decoder": (("latents",), ("probability",)),
}
# The preprocessing this runtime implements (runtime/image_io.py:preprocess); a bundle asking for other is refused.
SUPPORTED_INPUT = {"layout": "NCHW", "color": "RGB", "resize": "area"}
# What the runtime reads. ``model``, ``opset``, ``producer``, ``attention`` and ``checks`` are the exporter's record
# (engines/README.md: informational); ``checkpoint`` is read by ``--reference`` only, which says so when it is absent.
_REQUIRED = ("format_version", "name", "input", "latent", "sampling", "graphs")
# The DDIM update inside the UNet-step graph implements these; a bundle that declares another is refused.
SUPPORTED_SAMPLING = {"prediction_type": "sample", "eta": 0.0}


@dataclass(frozen=True)
class GraphEntry:
    name: str
    path: Path
    sha256: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    domains: tuple[str, ...]  # operator domains; "" is ONNX's own

    @property
    def nonstandard_domains(self) -> list[str]:
        """Operator domains beyond ONNX's own: an engine must implement them (onnxruntime does, TensorRT does not)."""
        return [d for d in self.domains if d not in ("", "ai.onnx")]


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: dict[str, Any]

    @property
    def image_size(self) -> int:
        return int(self.manifest["input"]["size"][0])

    @property
    def mean(self) -> list[float]:
        return list(self.manifest["input"]["mean"])

    @property
    def std(self) -> list[float]:
        return list(self.manifest["input"]["std"])

    @property
    def scale(self) -> float:
        """What a uint8 pixel is multiplied by before mean and std are applied."""
        return float(self.manifest["input"]["scale"])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        lat = self.manifest["latent"]
        return int(lat["channels"]), int(lat["size"][0]), int(lat["size"][1])

    @property
    def default_steps(self) -> int:
        return int(self.manifest["sampling"]["default_steps"])

    @property
    def default_ensemble(self) -> int:
        return int(self.manifest["sampling"]["default_ensemble"])

    @property
    def step_counts(self) -> list[int]:
        """The DDIM step counts the manifest carries schedules for."""
        return sorted(int(k) for k in self.manifest["sampling"]["schedules"])

    def plan(self, steps: int) -> DdimPlan:
        """The timesteps and coefficients of a ``steps``-step run (a distilled UNet's own plan where it has one)."""
        return DdimPlan.from_json(self._schedule(steps))

    def unet_graph(self, steps: int) -> str:
        """The UNet graph that runs ``steps`` steps: a student distilled for exactly that count, else the teacher."""
        return str(self._schedule(steps).get("unet", TEACHER_UNET))

    def _schedule(self, steps: int) -> dict[str, Any]:
        if steps not in self.step_counts:
            raise BundleError(f"{self.root}: no schedule for {steps} steps in the manifest "
                              f"(available: {self.step_counts}); re-export with --steps")
        return self.manifest["sampling"]["schedules"][str(steps)]

    @property
    def unet_graphs(self) -> list[str]:
        """Every UNet-step graph: the teacher's, then each distilled student's."""
        return [TEACHER_UNET, *sorted({self.unet_graph(k) for k in self.step_counts} - {TEACHER_UNET})]

    @property
    def graph_names(self) -> list[str]:
        """Every graph the bundle carries: the three of the format, then the students."""
        return [*GRAPH_NAMES, *self.unet_graphs[1:]]

    @property
    def distilled_steps(self) -> list[int]:
        """The step counts a distilled student runs."""
        return [k for k in self.step_counts if self.unet_graph(k) != TEACHER_UNET]

    @property
    def fast_steps(self) -> int | None:
        """The fewest steps a distilled student runs (the bundle's fast mode), or None without a student."""
        return min(self.distilled_steps, default=None)

    @property
    def bundle_id(self) -> str:
        """The bundle's identity: the sha256 of its manifest as canonical JSON, which names every graph's sha256, the
        schedules, the cue's and the detector's settings. TensorRT ``engines`` are left out: they are this machine's
        build of the same graphs, and building them must not make a scan or a server another bundle."""
        body = {k: v for k, v in self.manifest.items() if k != "engines"}
        return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    @property
    def sha256s(self) -> dict[str, str]:
        """The fp32 graphs' sha256 by graph name: the bundle's identity, as servers report it."""
        return {name: self.graph(name).sha256 for name in self.graph_names}

    @property
    def precisions(self) -> list[str]:
        """The precisions this bundle carries: always fp32, and those `diffiml export --precision` added."""
        return ["fp32", *sorted(self.manifest.get("precisions", {}))]

    def graph(self, name: str, precision: str = "fp32") -> GraphEntry:
        """The graph to run at ``precision``: its own file where that precision replaced it (e.g. the int8 encoder
        and UNet), else the fp32 graph (e.g. the decoder, kept fp32)."""
        if precision not in self.precisions:
            have = ", ".join(self.precisions)
            raise BundleError(f"{self.root}: no {precision} graphs in this bundle (it has {have}); "
                              f"export with --precision {precision}")
        g = self.manifest.get("precisions", {}).get(precision, {}).get("graphs", {}).get(name)
        g = g or self.manifest["graphs"].get(name)
        if g is None:
            raise BundleError(f"{self.root}: the manifest has no {name} graph")
        return GraphEntry(name, self.root / g["file"], g["sha256"], g["inputs"], g["outputs"], tuple(g["domains"]))

    @property
    def copy_move_cue(self) -> CopyMoveCue | None:
        """The classical copy-move cue the bundle's producer enabled (fused with the model's map), or None."""
        entry = self.manifest.get("copy_move_cue")
        return None if entry is None else CopyMoveCue.from_manifest(entry, str(self.root))

    @property
    def detector(self) -> Detector | None:
        """The calibrated image-level detector (score and decision), or None: the score is the map's top pixels."""
        entry = self.manifest.get("detector")
        return None if entry is None else Detector.from_manifest(entry, str(self.root))

    def checkpoint_path(self) -> Path:
        if "path" not in self.manifest.get("checkpoint", {}):
            raise BundleError(f"{self.root}: the manifest names no checkpoint; give --reference the checkpoint")
        return (self.root / self.manifest["checkpoint"]["path"]).resolve()


def verify_file(path: Path, expected_sha256: str) -> None:
    if not path.is_file():
        raise BundleError(f"{path}: listed in the manifest but missing; re-export the bundle")
    actual = sha256_of(path)
    if actual != expected_sha256:
        raise BundleError(f"{path}: sha256 {actual[:12]}… does not match the manifest's {expected_sha256[:12]}…; "
                          "the file is corrupted or was replaced — re-export the bundle")


def validate_manifest(manifest: Any, where: Path) -> None:
    if not isinstance(manifest, dict):
        raise BundleError(f"{where}: manifest.json is not a JSON object")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise BundleError(f"{where}: unknown bundle format_version {version!r}; this diffiml reads versions "
                          f"{', '.join(map(str, READABLE_VERSIONS))} — re-export the bundle with this version")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise BundleError(f"{where}: manifest.json lacks {', '.join(missing)}")
    for name in GRAPH_NAMES:
        g = manifest["graphs"].get(name)
        if not isinstance(g, dict) or not {"file", "sha256", "inputs", "outputs", "domains"} <= set(g):
            raise BundleError(f"{where}: manifest.json has no complete entry for graph {name!r}")
        names = (tuple(t.get("name") for t in g["inputs"]), tuple(t.get("name") for t in g["outputs"]))
        if names != GRAPH_IO[name]:
            raise BundleError(f"{where}: graph {name!r} has tensors {names}, but this runtime feeds and reads "
                              f"{GRAPH_IO[name]}")
    for precision, entry in manifest.get("precisions", {}).items():
        if precision not in PRECISIONS[1:] or not isinstance(entry, dict) or not isinstance(entry.get("graphs"), dict):
            raise BundleError(f"{where}: precision {precision!r} is not one this runtime reads ({PRECISIONS[1:]}) "
                              "or has no graphs")
        for name, g in entry["graphs"].items():
            if name not in manifest["graphs"] or not {"file", "sha256", "inputs", "outputs", "domains"} <= set(g):
                raise BundleError(f"{where}: the {precision} entry for graph {name!r} is incomplete or unknown")
            if [t.get("name") for t in g["inputs"]] != [t["name"] for t in manifest["graphs"][name]["inputs"]]:
                raise BundleError(f"{where}: the {precision} {name} graph's inputs differ from the fp32 graph's")
    if "copy_move_cue" in manifest:
        CopyMoveCue.from_manifest(manifest["copy_move_cue"], str(where))
    if "detector" in manifest:
        Detector.from_manifest(manifest["detector"], str(where))
    spec = manifest["input"]
    asked = {k: spec.get(k) for k in SUPPORTED_INPUT}
    if asked != SUPPORTED_INPUT or not all(k in spec for k in ("size", "scale", "mean", "std")):
        raise BundleError(f"{where}: input preprocessing {asked} is not what this runtime implements "
                          f"({SUPPORTED_INPUT}, with size, scale, mean and std)")
    if not (isinstance(spec["scale"], int | float) and spec["scale"] > 0):
        raise BundleError(f"{where}: input scale {spec['scale']!r} is not a positive number")
    declared = {k: manifest["sampling"].get(k, v) for k, v in SUPPORTED_SAMPLING.items()}
    if declared != SUPPORTED_SAMPLING:
        raise BundleError(f"{where}: sampling {declared} is not what the UNet-step graphs of this runtime implement "
                          f"({SUPPORTED_SAMPLING})")
    schedules = manifest["sampling"].get("schedules", {})
    if str(manifest["sampling"].get("default_steps")) not in schedules:
        raise BundleError(f"{where}: manifest.json has no schedule for its default step count")
    for steps, plan in schedules.items():
        if not isinstance(plan, dict) or not set(SCHEDULE_KEYS) <= set(plan) or any(
                len(plan[k]) != int(steps) for k in SCHEDULE_KEYS):
            raise BundleError(f"{where}: the {steps}-step schedule needs {', '.join(SCHEDULE_KEYS)}, one per step")
        unet = plan.get("unet", TEACHER_UNET)
        if unet != TEACHER_UNET:
            _validate_student(manifest, where, unet)


def _validate_student(manifest: dict[str, Any], where: Path, name: Any) -> None:
    """A distilled UNet is another UNet-step graph: the same tensors as the teacher's, so every backend runs it."""
    g = manifest["graphs"].get(name) if isinstance(name, str) else None
    if not isinstance(g, dict) or not {"file", "sha256", "inputs", "outputs", "domains"} <= set(g):
        raise BundleError(f"{where}: a schedule runs UNet graph {name!r}, which the manifest does not list completely")
    teacher = manifest["graphs"][TEACHER_UNET]
    if [t.get("name") for t in g["inputs"]] != [t["name"] for t in teacher["inputs"]] or \
            [t.get("name") for t in g["outputs"]] != [t["name"] for t in teacher["outputs"]]:
        raise BundleError(f"{where}: UNet graph {name!r} has other tensors than the teacher's {TEACHER_UNET!r}")


def load_bundle(root: str | Path, verify: bool = True) -> Bundle:
    """Read and validate ``root/manifest.json``; with ``verify``, check the sha256 of every graph file it lists."""
    root = Path(root)
    path = root / "manifest.json"
    if not path.is_file():
        raise BundleError(f"{root}: not an engine bundle (no manifest.json); create one with `diffiml export`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: unreadable manifest ({exc})") from exc
    validate_manifest(manifest, path)
    bundle = Bundle(root, manifest)
    if verify:
        for precision in bundle.precisions:
            for name in bundle.graph_names:
                g = bundle.graph(name, precision)
                verify_file(g.path, g.sha256)
    return bundle
