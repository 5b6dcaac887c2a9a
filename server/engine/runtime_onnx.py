"""The ONNX Runtime backbone: the engine's :class:`~server.engine.runtime.Backbone` over sessions.

On start the torch backbone is loaded once (CPU, float32) to compute its fingerprint, export it
and keep a float32 copy of its final LayerNorm; its blocks are then dropped. Exports are cached
in ``onnx_cache_dir`` under a name made of arch, fingerprint, token selection, export format and
int8, so a second start (or a second replica on the same volume) reuses the files. One session
per token selection (CLS rows only, all tokens) is created on first use; the CLS one at start,
so that the providers actually in use are known for ``/readyz`` and the metrics.

Providers: TensorRT (when the installed build has it and the device is CUDA), then CUDA (device
CUDA), then CPU. A CPU-only ``onnxruntime`` wheel silently runs CUDA requests on the CPU, so the
providers the session really got are checked and a fallback is logged loudly.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from restuning.backbone import TorchBackbone, load_backbone
from restuning.features import Features, FeatureSpec, TokenSelection
from restuning.onnx_export import (
    EXPORT_FORMAT,
    INPUT_NAME,
    META_FINGERPRINT,
    META_INT8,
    META_TOKENS,
    export_backbone_onnx,
    output_name,
)
from restuning.onnx_quant import quantize_backbone_onnx
from restuning.presets import DataConfig
from server.engine.runtime import compute_dtype
from server.engine.staging import HostStaging
from server.settings import Settings

log = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
GPU_PROVIDERS = (TENSORRT_PROVIDER, CUDA_PROVIDER)

ProviderSpec = tuple[str, dict[str, str]]


def cache_dir_of(settings: Settings) -> Path:
    """``settings.onnx_cache_dir``, or ``$RESTUNE_HOME/onnx`` when unset."""
    if settings.onnx_cache_dir:
        return Path(settings.onnx_cache_dir).expanduser()
    return settings.home_path / "onnx"


def cache_path(
    cache_dir: Path, arch: str, fingerprint: str, tokens: TokenSelection, *, int8: bool
) -> Path:
    """Where the export of one backbone and token selection is cached."""
    suffix = ".int8" if int8 else ""
    return cache_dir / f"{arch}-{fingerprint}-{tokens}-f{EXPORT_FORMAT}{suffix}.onnx"


def device_index(device: str) -> int:
    """N of ``cuda:N`` (0 for ``cuda``)."""
    _, _, index = device.partition(":")
    return int(index) if index else 0


def choose_providers(
    device: str,
    available: Sequence[str],
    *,
    tensorrt_options: Mapping[str, str] | None = None,
) -> list[ProviderSpec]:
    """Execution providers to request, best first; the CPU provider always ends the list.

    On ``cuda[:N]`` the CUDA provider is requested even when this build lacks it, so that the
    session's actual providers show the fallback instead of hiding it. TensorRT is requested
    only when the build has it (it needs its own libraries at runtime).
    """
    chosen: list[ProviderSpec] = []
    if device.startswith("cuda"):
        index = str(device_index(device))
        if TENSORRT_PROVIDER in available:
            chosen.append((TENSORRT_PROVIDER, {"device_id": index, **(tensorrt_options or {})}))
        chosen.append((CUDA_PROVIDER, {"device_id": index}))
    chosen.append((CPU_PROVIDER, {}))
    return chosen


def missing_gpu_providers(requested: Sequence[ProviderSpec], actual: Sequence[str]) -> list[str]:
    """GPU providers that were asked for but that the session does not use."""
    return [name for name, _ in requested if name in GPU_PROVIDERS and name not in actual]


@dataclass(frozen=True)
class CachedExports:
    """The ONNX files of one backbone, per token selection, and which were built this time."""

    paths: dict[TokenSelection, Path]
    built: tuple[Path, ...]


def ensure_exports(
    backbone: TorchBackbone,
    cache_dir: Path,
    *,
    int8: bool,
    selections: Sequence[TokenSelection] = ("cls", "all"),
) -> CachedExports:
    """Export (and quantize) whatever of ``selections`` is not cached yet; reuse the rest."""
    paths: dict[TokenSelection, Path] = {}
    built: list[Path] = []
    for tokens in selections:
        fp32 = cache_path(cache_dir, backbone.arch, backbone.fingerprint, tokens, int8=False)
        target = (
            cache_path(cache_dir, backbone.arch, backbone.fingerprint, tokens, int8=True)
            if int8
            else fp32
        )
        if target.is_file():
            log.info("reusing cached ONNX backbone %s", target)
        else:
            if not fp32.is_file():
                export_backbone_onnx(backbone, fp32, tokens=tokens)
                built.append(fp32)
            if int8:
                quantize_backbone_onnx(fp32, target)
                built.append(target)
        paths[tokens] = target
    return CachedExports(paths, tuple(built))


class OnnxBackbone:
    """:class:`~server.engine.runtime.Backbone` running exported graphs in ONNX Runtime."""

    runtime = "onnxruntime"

    def __init__(
        self,
        *,
        arch: str,
        fingerprint: str,
        data_config: DataConfig,
        final_norm: nn.LayerNorm,
        depth: int,
        is_random: bool,
        model_paths: Mapping[TokenSelection, Path],
        device: str = "cpu",
        threads: int = 0,
        int8: bool = False,
        io_binding: bool | None = None,
        tensorrt_options: Mapping[str, str] | None = None,
    ) -> None:
        """Open the CLS session (or the first one given) at once; others on first use.

        ``io_binding``: feed and fetch through IO binding into torch buffers (None: only when
        a GPU provider runs the session; True forces it, also on the CPU).
        """
        import onnxruntime as ort

        self.arch = arch
        self.fingerprint = fingerprint
        self.data_config = data_config
        self._final_norm = final_norm
        self._depth = depth
        self.is_random = is_random
        self.int8 = int8
        self.model_paths = dict(model_paths)
        self.threads = threads
        self.requested_device = device
        self.requested = choose_providers(
            device, ort.get_available_providers(), tensorrt_options=tensorrt_options
        )
        self._io_binding = io_binding
        self._sessions: dict[TokenSelection, Any] = {}
        self._tokens_out: dict[TokenSelection, int] = {}
        self._lock = threading.Lock()
        self._providers: list[str] = []
        self._staging = HostStaging(device if device.startswith("cuda") else "cpu")
        first: TokenSelection = "cls" if "cls" in self.model_paths else next(iter(self.model_paths))
        self._session(first)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_torch(
        cls,
        backbone: TorchBackbone,
        cache_dir: Path,
        *,
        device: str = "cpu",
        threads: int = 0,
        int8: bool = False,
        io_binding: bool | None = None,
        tensorrt_options: Mapping[str, str] | None = None,
    ) -> OnnxBackbone:
        """Export ``backbone`` (float32 CPU) into ``cache_dir`` unless cached, then open it.

        Only a float32 copy of the final norm is kept from ``backbone``: drop it afterwards to
        free the torch weights.
        """
        if int8 and device.startswith("cuda"):
            log.warning(
                "RESTUNE_ONNX_INT8 is a CPU option (dynamic int8 MatMulInteger has no fast CUDA "
                "kernels); running the float32 graph on %s",
                device,
            )
            int8 = False
        selections: tuple[TokenSelection, ...] = (
            ("cls", "all") if backbone.config.class_token else ("all",)
        )
        exports = ensure_exports(backbone, cache_dir, int8=int8, selections=selections)
        norm = copy.deepcopy(backbone.final_norm).to(device="cpu", dtype=torch.float32)
        return cls(
            arch=backbone.arch,
            fingerprint=backbone.fingerprint,
            data_config=backbone.data_config,
            final_norm=norm.requires_grad_(False),
            depth=backbone.depth,
            is_random=backbone.is_random,
            model_paths=exports.paths,
            device=device,
            threads=threads,
            int8=int8,
            io_binding=io_binding,
            tensorrt_options=tensorrt_options,
        )

    # ------------------------------------------------------------------ Backbone protocol

    @property
    def final_norm(self) -> nn.LayerNorm:
        """float32 copy of the backbone's frozen final LayerNorm (CPU)."""
        return self._final_norm

    @property
    def dim(self) -> int:
        return int(self._final_norm.normalized_shape[0])

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def open_sessions(self) -> tuple[TokenSelection, ...]:
        """Token selections whose session exists (the others open on first use)."""
        return tuple(self._sessions)

    @property
    def providers(self) -> list[str]:
        """Execution providers the sessions really use, best first."""
        return list(self._providers)

    @property
    def on_gpu(self) -> bool:
        """Whether a GPU provider runs the graph (False after a fallback to the CPU)."""
        return bool(self._providers) and self._providers[0] in GPU_PROVIDERS

    @property
    def device(self) -> str:
        """Where features are computed: the CUDA device, or ``cpu`` (also after a fallback)."""
        return self.requested_device if self.on_gpu else "cpu"

    @property
    def dtype(self) -> str:
        return "int8" if self.int8 else "float32"

    def forward_features(self, images: torch.Tensor, spec: FeatureSpec) -> Features:
        """Normalised images (B, 3, H, W) -> features (L', B, N', D), float32.

        Only ``spec``'s layers are fetched from the session (``output_names``); the graph runs
        whole either way.
        """
        if spec.layers[-1] > self._depth:
            raise ValueError(f"layers must lie in 0..{self._depth}, got {list(spec.layers)}")
        session = self._session(spec.tokens)
        names = [output_name(layer) for layer in spec.layers]
        bind = self._io_binding if self._io_binding is not None else self.on_gpu
        if bind:
            return Features(spec, self._run_bound(session, spec.tokens, images, names))
        feed = images.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        outputs = session.run(names, {INPUT_NAME: feed})  # L' x (B, N', D)
        return Features(spec, torch.from_numpy(np.stack(outputs)))  # (L', B, N', D)

    # ------------------------------------------------------------------ sessions

    def _session(self, tokens: TokenSelection) -> Any:
        """The session of ``tokens``, created on first use (thread-safe)."""
        session = self._sessions.get(tokens)
        if session is not None:
            return session
        with self._lock:
            session = self._sessions.get(tokens)
            if session is None:
                session = self._open(tokens)
                self._sessions[tokens] = session
            return session

    def _open(self, tokens: TokenSelection) -> Any:
        import onnxruntime as ort

        path = self.model_paths.get(tokens)
        if path is None:
            raise ValueError(f"this backbone has no {tokens!r} export")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = self.threads  # 0: ORT's default (physical cores)
        options.inter_op_num_threads = 1  # a ViT graph is one chain: nothing runs in parallel
        # Idle ORT workers otherwise spin for a while after each run, stealing the cores that
        # the torch fan-out and the decode threads need next (measured on the 2-core box:
        # ViT-S/16 batch 1 358 -> 200 ms, and the torch step after it 1028 -> 621 ms).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), options, providers=self.requested)
        self._check_metadata(path, tokens, session.get_modelmeta().custom_metadata_map)
        actual = list(session.get_providers())
        missing = missing_gpu_providers(self.requested, actual)
        if missing:
            log.error(
                "*** ONNX Runtime could not use %s for device %s and runs on %s instead: "
                "the installed onnxruntime %s offers %s. On GPU hosts install the GPU build "
                "(pip install -e '.[gpu]', not '.[cpu]': the two wheels conflict). ***",
                ", ".join(missing),
                self.requested_device,
                ", ".join(actual),
                ort.__version__,
                ", ".join(ort.get_available_providers()),
            )
        if not self._providers:
            self._providers = actual
        shape = session.get_outputs()[0].shape  # [batch, N', D]
        self._tokens_out[tokens] = int(shape[1])
        log.info(
            "ONNX Runtime session %s (%s tokens, %s) on %s",
            path.name,
            tokens,
            self.dtype,
            ", ".join(actual),
        )
        return session

    def _check_metadata(self, path: Path, tokens: str, meta: Mapping[str, str]) -> None:
        expected = {
            META_FINGERPRINT: self.fingerprint,
            META_TOKENS: tokens,
            META_INT8: "1" if self.int8 else "0",
        }
        wrong = {k: meta.get(k) for k, v in expected.items() if meta.get(k) != v}
        if wrong:
            raise RuntimeError(
                f"{path} is not the export this backbone needs (expected {expected}, file has "
                f"{wrong}); delete it to export again"
            )

    def _run_bound(
        self, session: Any, tokens: TokenSelection, images: torch.Tensor, names: list[str]
    ) -> torch.Tensor:  # (L', B, N', D)
        """Run with IO binding: the input is read from, and every output written straight
        into, torch memory on the session's device (no host round trip on a GPU)."""
        gpu = self.on_gpu
        if gpu:
            device_type, device_id = "cuda", device_index(self.requested_device)
            x = self._staging.to_device(images).to(dtype=torch.float32).contiguous()
        else:
            device_type, device_id = "cpu", 0
            x = images.detach().to(device="cpu", dtype=torch.float32).contiguous()
        batch = int(x.shape[0])
        out = torch.empty(
            (len(names), batch, self._tokens_out[tokens], self.dim),
            dtype=torch.float32,
            device=x.device,
        )  # (L', B, N', D)
        binding = session.io_binding()
        binding.bind_input(
            INPUT_NAME, device_type, device_id, np.float32, tuple(x.shape), x.data_ptr()
        )
        for index, name in enumerate(names):
            layer_out = out[index]  # (B, N', D), contiguous slice of out
            binding.bind_output(
                name,
                device_type,
                device_id,
                np.float32,
                tuple(layer_out.shape),
                layer_out.data_ptr(),
            )
        if gpu:
            # ORT computes on its own stream: the input written on torch's must be complete.
            torch.cuda.current_stream(x.device).synchronize()
        session.run_with_iobinding(binding)
        return out


def load_onnx_backbone(settings: Settings, arch: str, weights: str) -> OnnxBackbone:
    """The ONNX Runtime backbone for ``settings`` (exports on first start). Slow: off the loop."""
    torch_backbone = load_backbone(arch, weights)  # float32 CPU: what gets exported
    fp16 = compute_dtype(settings) != torch.float32
    _, height, width = torch_backbone.data_config.input_size
    cache_dir = cache_dir_of(settings)
    backbone = OnnxBackbone.from_torch(
        torch_backbone,
        cache_dir,
        device=settings.device,
        threads=settings.threads,
        int8=settings.onnx_int8,
        tensorrt_options=tensorrt_options(
            cache_dir, height, width, settings.max_batch_images, fp16=fp16
        ),
    )
    del torch_backbone  # the blocks are in the ONNX files now; keep only the norm copy
    return backbone


def tensorrt_options(
    cache_dir: Path, height: int, width: int, max_batch: int, *, fp16: bool
) -> dict[str, str]:
    """TensorRT EP options: an engine cache beside the exports and a dynamic batch profile."""
    shape = f"3x{height}x{width}"
    return {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache_dir / "tensorrt"),
        "trt_fp16_enable": str(fp16),
        "trt_profile_min_shapes": f"{INPUT_NAME}:1x{shape}",
        "trt_profile_opt_shapes": f"{INPUT_NAME}:{max_batch}x{shape}",
        "trt_profile_max_shapes": f"{INPUT_NAME}:{max_batch}x{shape}",
    }
