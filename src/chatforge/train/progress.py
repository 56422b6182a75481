"""Training progress: the tqdm bar (loss, tokens/s, MFU, ETA), `metrics.jsonl` and TensorBoard.

Only rank 0 writes; on other ranks every method is a no-op. Used by `loop.train`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from chatforge import files

try:  # TensorBoard is optional at run time: metrics.jsonl has everything.
    from torch.utils.tensorboard import SummaryWriter
except ImportError:
    SummaryWriter = None


class Logger:
    def __init__(self, out_dir: Path, master: bool, total: int, start: int = 0,
                 flops_per_token: float | None = None, peak: float | None = None):
        self.master = master
        self.flops, self.peak = flops_per_token, peak
        self.metrics: dict = {}
        if not master:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        self._truncate(start)
        self.file = open(self.path, "a", encoding="utf-8")
        self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=start + 1 if start else None) if SummaryWriter else None
        self.bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=None, dynamic_ncols=True)
        self.t_last, self.tokens_last = time.perf_counter(), 0
        self.rate = 0.0

    def _truncate(self, start: int) -> None:
        """On resume, drop lines logged after the checkpoint (they will be logged again)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= start:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash

        files.write_text(self.path, "".join(f"{line}\n" for line in kept))

    def info(self, text: str) -> None:
        if self.master:
            tqdm.write(text)

    def step(self, step: int, tokens: int, step_tokens: int) -> None:
        """Advance the bar; tokens/s over the steps since the last call that logged."""
        if not self.master:
            return
        self.tokens_last += step_tokens
        self.bar.update(1)

    def _throughput(self) -> tuple[float, float | None]:
        now = time.perf_counter()
        rate = self.tokens_last / max(now - self.t_last, 1e-9)
        self.t_last, self.tokens_last = now, 0
        mfu = rate * self.flops / self.peak if self.flops and self.peak else None
        return rate, mfu

    def record(self, step: int, tokens: int, **values) -> None:
        """One metrics.jsonl line (and TensorBoard scalars); training records carry throughput."""
        if not self.master:
            return
        row = {"step": step, "tokens": tokens}
        if "loss" in values:
            rate, mfu = self._throughput()
            values.update(tokens_per_s=round(rate, 1), mfu=None if mfu is None else round(mfu, 4))
            postfix = {"loss": f"{values['loss']:.3f}", "tok/s": f"{rate:,.0f}"}
            if mfu is not None:
                postfix["mfu"] = f"{100 * mfu:.0f}%"
            self.bar.set_postfix(postfix, refresh=False)
        else:
            self.info(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
        row.update({k: v for k, v in values.items() if v is not None})
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "tokens") and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if not self.master:
            return
        self.bar.close()
        self.file.close()
        if self.tb is not None:
            self.tb.close()
