"""The "disk" weight channel (fallback, and the only channel across clusters): an HF checkpoint folder written with
weights/hf_checkpoint and loaded with /update_weights_from_disk. The folder of a version appears whole (written
aside, then renamed), under rollout.sglang.weights_dir when the servers need a shared filesystem to see it."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

from rntp_megatron.rollout.sglang.client import SGLangServerError
from rntp_megatron.rollout.sglang.delta import DeltaSync
from rntp_megatron.weights.buckets import NamedTensors


class DiskChannel:
    """Pushes as folders v<version> under `root`; keeps the last folder of deltas while later ones follow it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.delta_folder: Optional[Path] = None  # the last folder of deltas (model_path stays a full one)

    def push(self, buckets: Iterable[NamedTensors], version: int, model_path: Optional[str],
             hf_config: Optional[dict], delta: Optional[DeltaSync], load: Callable[[Path, int, bool], None]
             ) -> dict[str, float]:
        """Write an HF folder (config of the served model: model_path's, else hf_config), `load` it into every
        receiver (folder, version, whether it is complete), drop the previous pushed version; seconds per phase."""
        from rntp_megatron.weights.hf_checkpoint import save_hf_checkpoint

        source = Path(model_path) if model_path else None
        if source is not None and (source / "config.json").exists():
            has_tokenizer = any((source / f).exists() for f in ("tokenizer.json", "tokenizer.model"))
            config, tokenizer_dir = json.loads((source / "config.json").read_text()), source if has_tokenizer else None
        elif hf_config is not None:  # an attached server: the trainer knows what it serves
            config, tokenizer_dir = hf_config, None
        else:
            raise SGLangServerError("the disk channel needs the served model's config.json: a model_path folder or "
                                    "hf_config (the placement passes the trainer's)")
        t0 = time.perf_counter()
        folder = save_hf_checkpoint(buckets, self.root / f"v{version}", config, tokenizer_dir=tokenizer_dir,
                                    overwrite=True)
        t1 = time.perf_counter()
        complete = delta is None or delta.sent_whole()  # a folder of deltas is no model to start from
        load(folder, version, complete)
        # older pushed versions (never the user's folder); the last complete one stays while deltas follow it
        for older in (self.delta_folder, source if complete else None):
            if older is not None and older.parent == folder.parent and older != folder:
                shutil.rmtree(older, ignore_errors=True)
        self.delta_folder = None if complete else folder
        return {"write_s": t1 - t0, "server_s": time.perf_counter() - t1}
