"""Pushing a saved folder to the Hub: everything in one `upload_folder` commit, the repo created if needed.

transformers' own `push_to_hub` is not used: it rewrites README.md, and the card here is ours.
Every call goes through one `HfApi` (the caller's, in tests a mock). The token is handed to
`huggingface_hub` and never printed or put in a message; a failed push leaves the folder as it was.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard

from ..errors import PrunedCheckpointError, PushError


@dataclass(frozen=True)
class PushPlan:
    """What a push sends: the folder's files (relative paths, sorted), the card's metadata and the
    evaluation results its `model-index` holds, as `huggingface_hub.ModelCard.load` reads them back."""

    folder: Path
    repo_id: str
    files: list[str]
    card_metadata: dict
    eval_results: list[EvalResult] = field(default_factory=list)

    def describe(self) -> str:
        sizes = [(name, (self.folder / name).stat().st_size) for name in self.files]
        lines = [f"{self.repo_id} ← {self.folder}: {len(self.files)} files in one commit"]
        lines += [f"  {size:>14,}  {name}" for name, size in sizes]
        lines.append(f"  {sum(size for _, size in sizes):>14,}  bytes in all")
        lines.append("card metadata:")
        lines += [f"  {key}: {value}" for key, value in self.card_metadata.items() if key != "model-index"]
        lines.append("evaluation results (model-index, self-reported):")
        for result in self.eval_results:
            data = ", ".join(
                part for part in (result.dataset_type, result.dataset_config, result.dataset_split) if part
            )
            lines.append(
                f"  {result.metric_type} = {result.metric_value} on {result.dataset_name} ({data}), "
                f"{result.task_type}: {result.metric_name}"
            )
        if not self.eval_results:
            lines.append("  none: nothing was measured")
        return "\n".join(lines)


def plan_push(folder: str | os.PathLike, repo_id: str) -> PushPlan:
    """Check that `folder` is a saved checkpoint with a card and list what a push would send."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise PrunedCheckpointError(f"{folder} has no config.json; push the folder that save_pretrained wrote.")
    if not (folder / "README.md").is_file():
        raise PrunedCheckpointError(f"{folder} has no README.md model card; re-save it with hf_prune to write one.")
    files = sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )
    card = ModelCard.load(folder / "README.md")  # raises ValueError on a model-index the Hub would refuse
    return PushPlan(folder, repo_id, files, card.data.to_dict(), card.data.eval_results or [])


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    api: HfApi | None = None,
) -> str:
    """Create `repo_id` if needed and upload the folder's files in one commit; returns the commit URL."""
    plan = plan_push(folder, repo_id)
    api = api or HfApi()
    message = commit_message or f"Upload pruned model ({len(plan.files)} files) with hf_prune"
    try:
        api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(plan.folder),
            repo_type="model",
            token=token,
            commit_message=message,
            allow_patterns=plan.files,
        )
    except Exception as error:  # network, auth, quota, ...: all retried the same way
        detail = f"{type(error).__name__}: {error}"
        if token:
            detail = detail.replace(token, "***")
        raise PushError(
            f"pushing {plan.folder} to {repo_id} failed ({detail}). The folder is unchanged; retry with "
            f"`hf-prune push {plan.folder} {repo_id}` once the cause is fixed (log in with `hf auth login` "
            "or set HF_TOKEN if it was an authentication error)."
        ) from None
    return str(getattr(commit, "commit_url", commit))


def push_saved(repo_id: str, saved: Path | None, save: Callable[[Path], os.PathLike | str], **push_kwargs) -> str:
    """Push `saved`, the folder that holds the current state, or, when there is none (`None`), what
    `save(folder)` writes into a temporary folder named after the repo; `push_kwargs` go to `push_folder`."""
    if saved is not None:
        return push_folder(saved, repo_id, **push_kwargs)
    with tempfile.TemporaryDirectory(prefix="hf_prune-push-") as staging:
        folder = save(Path(staging) / repo_id.rpartition("/")[2])
        return push_folder(folder, repo_id, **push_kwargs)
