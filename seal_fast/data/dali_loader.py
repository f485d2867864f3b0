"""`--loader dali`: NVIDIA DALI decodes and augments; the order and the random choices are the shared ones.

Per batch the pipeline is fed the encoded JPEG bytes, labels, crop starts and flips (from
augment.epoch_indices / crop_flip_params, exactly what the other loaders use), then decodes
(`mixed`, on the GPU, when there is one; CPU operators with device_id=None otherwise), pads with
zeros and crops (fn.slice, out-of-bounds padding), flips and normalizes (fn.crop_mirror_normalize),
and hands the batch to torch through DALI's PyTorch plugin (feed_ndarray). One batch is in flight at
a time (prefetch depth 1; DALI's threads decode each batch in parallel). Grayscale JPEGs decode to
RGB; a corrupt one is named by re-reading the failing batch with PIL. The first time an image is fed, its header is
read (PIL, from the bytes in memory): one that would decode to over images.MAX_PIXELS pixels (a decompression bomb)
stops the run with a DataError naming it, before DALI decodes it.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .augment import PAD, crop_flip_params, epoch_indices
from .images import MEAN, STD, check_encoded, load_rgb
from .layout import Split

INSTALL_HINT = ("NVIDIA DALI is not installed: pip install nvidia-dali-cuda130 (or pip install -e '.[dali]'; "
                "CUDA 13; see https://docs.nvidia.com/deeplearning/dali for others), or use --loader cache or "
                "--loader torch")


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401  (the import is the check)
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


class DaliLoader:
    """`epoch(e)` yields (normalized images [B,3,H,W] on `device`, int64 labels on `device`)."""

    name = "dali"

    def __init__(self, split: Split, batch_size: int, train: bool, seed: int, workers: int, device: torch.device,
                 channels_last: bool = False, rank: int = 0, world: int = 1, progress: bool = False):
        if not dali_available():  # progress: DALI decodes as it goes, nothing ahead
            raise ConfigError(f"--loader dali: {INSTALL_HINT}")
        self.split, self.batch_size, self.train, self.seed = split, batch_size, train, seed
        self.rank, self.world, self.channels_last = rank, world, channels_last
        self.device = torch.device(device)
        self.n = len(split.files)
        self.height, self.width = load_rgb(split.files[0]).shape[:2]
        self._checked = np.zeros(self.n, dtype=bool)  # images whose header passed images.MAX_PIXELS
        self.pipe = self._build(max(1, workers))

    def _build(self, threads: int):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if gpu else None
        h, w = self.height, self.width

        @pipeline_def(batch_size=self.batch_size, num_threads=threads, device_id=device_id, prefetch_queue_depth=1)
        def pipeline():
            jpegs = fn.external_source(name="jpegs", dtype=types.UINT8)
            labels = fn.external_source(name="labels", dtype=types.INT64)
            images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
            mirror = 0
            if self.train:
                start = fn.external_source(name="start", dtype=types.INT32)   # (dy - 4, dx - 4): may be negative
                mirror = fn.external_source(name="flip", dtype=types.INT32)
                images = fn.slice(images, start, [h, w], axis_names="HW", out_of_bounds_policy="pad", fill_values=0)
            images = fn.crop_mirror_normalize(
                images, mirror=mirror, dtype=types.FLOAT, output_layout="HWC" if self.channels_last else "CHW",
                mean=[255 * m for m in MEAN], std=[255 * s for s in STD])
            return images, labels

        pipe = pipeline()
        pipe.build()
        return pipe

    def __len__(self) -> int:
        return -(-self.num_images // self.batch_size)

    @property
    def num_images(self) -> int:
        return len(epoch_indices(self.n, self.seed, 0, self.rank, self.world, shuffle=False))

    def _feed(self, idx: np.ndarray, dy, dx, flip) -> None:
        self._fed_files = [self.split.files[i] for i in idx]
        encoded = [np.fromfile(f, dtype=np.uint8) for f in self._fed_files]
        for i, f, data in zip(idx, self._fed_files, encoded):  # a decompression bomb never reaches the decoder
            if not self._checked[i]:
                check_encoded(f, data)   # its header only (about 20 us), once per image
                self._checked[i] = True
        self.pipe.feed_input("jpegs", encoded)
        self.pipe.feed_input("labels", [np.array(self.split.labels[i], dtype=np.int64) for i in idx])
        if self.train:
            self.pipe.feed_input("start", [np.array([a - PAD, b - PAD], dtype=np.int32) for a, b in zip(dy, dx)])
            self.pipe.feed_input("flip", [np.array(f, dtype=np.int32) for f in flip])

    def _to_torch(self, tensor_list, dtype) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        t = tensor_list.as_tensor()
        out = torch.empty(t.shape(), dtype=dtype, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(t, out, cuda_stream=stream)
        return out

    def epoch(self, e: int):
        idx = epoch_indices(self.n, self.seed, e, self.rank, self.world, shuffle=self.train)
        dy = dx = flip = None
        if self.train:
            dy, dx, flip = crop_flip_params(self.seed, e, idx)
        for s in range(0, len(idx), self.batch_size):
            sl = slice(s, s + self.batch_size)
            self._feed(idx[sl], *(None if v is None else v[sl] for v in (dy, dx, flip)))
            try:
                images, labels = self.pipe.run()
            except Exception as exc:  # noqa: BLE001 - DALI raises RuntimeError/IndexError with C++ context
                self._raise_named(self._fed_files, exc)
            x = self._to_torch(images, torch.float32)
            if self.channels_last:  # NHWC in memory, NCHW logically
                x = x.permute(0, 3, 1, 2)
            y = self._to_torch(labels, torch.int64).reshape(-1)
            yield x, y

    def _raise_named(self, files: list[str], exc: Exception):
        for f in files:
            load_rgb(f)  # raises DataError naming the file if PIL cannot decode it either
        raise DataError(f"DALI failed on a batch of {len(files)} images starting with {files[0]}: "
                        f"{str(exc).splitlines()[0]}")
