"""Stage 5, export: a trained checkpoint becomes a Hub-ready folder, and is pushed when asked.

Reads a checkpoint folder (from desta train). Writes OUT/ with config.json, model.safetensors
(trainable weights by default; with `full`, the whole model with LoRA merged and both bases' generation
settings, loadable without the base checkpoints and answering as the checkpoint does), the processor and
tokenizer files, and README.md: a model card with Hub
metadata, how it was trained (run_config.yaml, summary.json) and the eval table (report.json).
`push` creates the repository and uploads the folder with huggingface_hub; the token comes from
$HF_TOKEN or the user's login and is never printed or written. Nothing written names a local path
(which would be published): base checkpoints, data and folders appear as Hub ids or folder names.
An existing OUT is replaced only with `overwrite`, and only when it is empty or an earlier export.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from desta.core.args import raise_problems
from desta.core.artifacts import CONFIG, DATASET, MODEL_CARD, REPORT_MD, RUN_CONFIG, SUMMARY
from desta.core.hub import public_name
from desta.core.summary import Summary
from desta.model.loading import load

if TYPE_CHECKING:
    pass


def _publish_config(folder: Path) -> None:
    """Rewrite folder/config.json with every checkpoint reference (`*name_or_path`) as its public name."""
    def scrub(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: public_name(v) if k.endswith("name_or_path") and isinstance(v, str) else scrub(v)
                    for k, v in value.items()}
        return [scrub(v) for v in value] if isinstance(value, list) else value

    path = folder / CONFIG
    path.write_text(json.dumps(scrub(json.loads(path.read_text())), indent=2, sort_keys=True) + "\n")


def export(checkpoint: str | Path, out: str | Path, full: bool = False, encoder_id: str | None = None,
           llm_id: str | None = None, license: str = "other", report: str | Path | None = None,
           overwrite: bool = False) -> Path:
    """Write the Hub-ready folder; `encoder_id` / `llm_id` name the base checkpoints' Hub ids (otherwise a
    local base is named by its folder name, and loading the export looks for a folder of that name beside it,
    desta.model.bases.locate_base). An existing `out` is replaced only with `overwrite`."""
    checkpoint, out = Path(checkpoint), Path(out)
    if not (checkpoint / CONFIG).is_file():
        raise FileNotFoundError(f"{checkpoint} is not a checkpoint folder (no config.json); give the output "
                                "folder of desta train")
    _clear(out, checkpoint, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = load(checkpoint)
    config = model.config
    if encoder_id:
        config.encoder_name_or_path = encoder_id
    if llm_id:
        config.llm_name_or_path = llm_id
    bases = {"encoder": config.encoder_name_or_path, "llm": config.llm_name_or_path}
    model.save_pretrained(out, full=full)
    _publish_config(out)
    processor.save_pretrained(out)
    report_path = _report_markdown(Path(report)) if report else next(iter(sorted(checkpoint.glob(f"**/{REPORT_MD}"))),
                                                                        None)
    (out / MODEL_CARD).write_text(model_card(checkpoint, out, bases, full, license, report_path))
    return out


def _clear(out: Path, checkpoint: Path, overwrite: bool) -> None:
    """Make way for the export: nothing to do for a missing or empty `out`; an earlier export is removed with
    `overwrite`; anything else (a folder that is not an export, the checkpoint itself) is refused."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    resolved = out.resolve()
    if resolved == checkpoint.resolve() or resolved in checkpoint.resolve().parents:
        raise FileExistsError(f"{out} holds the checkpoint being exported; give another output folder")
    if not overwrite:
        raise FileExistsError(f"{out} already exists; give another output folder, or --overwrite to replace it")
    if not ((out / MODEL_CARD).is_file() and "library_name: desta" in (out / MODEL_CARD).read_text()[:200]):
        raise FileExistsError(f"{out} is not an earlier desta export (no model card of desta's); --overwrite "
                              "replaces only an export: give another output folder")
    shutil.rmtree(out)


def _report_markdown(path: Path) -> Path:
    """The report.md of an eval: given its folder, its report.json or itself."""
    markdown = path / REPORT_MD if path.is_dir() else path.with_name(REPORT_MD)
    if not markdown.is_file():
        raise FileNotFoundError(f"{markdown} not found; give the output folder of desta eval (or its report.json)")
    return markdown


def _metadata_block(bases: dict[str, str | None], license: str, datasets: list[str]) -> str:
    lines = ["---", "library_name: desta", f"license: {license}", "pipeline_tag: audio-text-to-text",
             "tags:", "  - desta", "  - speech", "  - audio", "  - speech-language-model"]
    hub_bases = [b for b in bases.values() if b and public_name(b) == b]
    if hub_bases:
        lines += ["base_model:"] + [f"  - {b}" for b in hub_bases]
    if datasets:
        lines += ["datasets:"] + [f"  - {d}" for d in datasets]
    return "\n".join(lines + ["---", ""])


def model_card(checkpoint: Path, out: Path, bases: dict[str, str | None], full: bool, license: str,
               report_path: Path | None) -> str:
    """README.md text for the Hub: metadata header, what the model is made of, how it was trained
    (from the checkpoint's run_config.yaml and summary.json), the eval table when there is one, and usage."""
    import yaml

    run = yaml.safe_load((checkpoint / RUN_CONFIG).read_text()) if (checkpoint / RUN_CONFIG).exists() else {}
    summary = json.loads((checkpoint / SUMMARY).read_text()) if (checkpoint / SUMMARY).exists() else {}
    data = run.get("data", {})
    datasets = [Path(d).parent.name if Path(d).name == DATASET else Path(d).name
                for d in (data.get("train"),) if d]
    name = out.name
    local = [b for b in bases.values() if b and public_name(b) != b]
    lines = [_metadata_block(bases, license, datasets), f"# {name}", "",
             "A DeSTA speech language model: a frozen Whisper encoder, a Q-Former connector and a frozen chat LLM"
             + (" with LoRA" if run.get("model", {}).get("lora") else "") + ", trained with "
             "[desta](https://pypi.org/project/desta/) on the LLM's own answers to descriptions of the audio "
             "(self-output, as in DeSTA2).", "",
             "| part | checkpoint |", "|---|---|",
             f"| speech encoder (frozen) | {public_name(bases['encoder']) or 'included'} |",
             f"| LLM (frozen) | {public_name(bases['llm']) or 'included'} |",
             "| weights in this repository | " + ("the whole model, LoRA merged" if full else
                                                 "connector and LoRA only") + " |",
             ""]
    if local:
        lines += ["Base checkpoints that were local folders when this was exported are named by their folder "
                  "name only (no local path is published); loading looks for a folder of that name, so export "
                  "with `--encoder-id` / `--llm-id` to name their Hub ids instead.", ""]
    if summary or run:
        lines += ["## Training", "",
                  f"- output folder: `{public_name(run.get('output_dir')) or checkpoint.name}`",
                  f"- data: `{', '.join(datasets) or 'n/a'}`, {summary.get('train_rows', 'n/a')} training rows"
                  f" ({summary.get('replay_rows', 0)} text replay), {summary.get('eval_rows', 'n/a')} held out",
                  f"- steps: {summary.get('steps', 'n/a')}, batch {run.get('optim', {}).get('batch_size', 'n/a')}, "
                  f"lr {run.get('optim', {}).get('lr', 'n/a')}, Q-Former layers "
                  f"{run.get('model', {}).get('qformer_layers', 'n/a')}",
                  f"- train loss {summary.get('first_train_loss', 'n/a')} -> {summary.get('last_train_loss', 'n/a')}",
                  f"- trainable parameters: {summary.get('trainable_parameters', 'n/a')} of "
                  f"{summary.get('total_parameters', 'n/a')}", ""]
    if report_path and report_path.exists():
        table = report_path.read_text().split("\n", 2)[2]  # the eval report without its title
        lines += ["## Evaluation on unseen instructions", "", table]
    repo = f"YOUR_NAME/{name}"
    lines += ["## Use", "", "```bash", "pip install desta", "```", "", "```python", "import desta",
              "from desta.audio import load_audio", "",
              f'model, processor = desta.load("{repo}")  # or the local folder',
              "messages = processor.conversation('What can you hear from the audio?')  # system prompt + audio slot",
              'print(model.chat(processor, messages, [load_audio("speech.wav")]))', "```", "",
              f"From a shell: `desta chat {repo} --audio speech.wav \"What can you hear from the audio?\"`", ""]
    return "\n".join(lines)


def files_to_upload(folder: str | Path) -> list[tuple[str, int]]:
    """(path relative to `folder`, size in bytes) of every file under it, sorted by path."""
    folder = Path(folder)
    return [(str(p.relative_to(folder)), p.stat().st_size) for p in sorted(folder.rglob("*")) if p.is_file()]


def push(folder: str | Path, repo_id: str, private: bool = False, dry_run: bool = False,
         endpoint: str | None = None) -> dict[str, Any]:
    """Create the Hub repository and upload the folder (or, dry, only list what would go)."""
    files = files_to_upload(folder)
    if dry_run:
        return {"repo_id": repo_id, "dry_run": True, "files": files}
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=endpoint)  # token: $HF_TOKEN or `hf auth login`; never read or printed here
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   commit_message="Upload DeSTA model exported with desta")
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        if status in (401, 403):
            raise PermissionError(f"the Hub refused the token for {repo_id} (HTTP {status}); log in with "
                                  "`hf auth login` or set HF_TOKEN to a token with write access") from None
        raise RuntimeError(f"the Hub rejected the upload of {repo_id} (HTTP {status}): {str(err)[:200]}") from None
    except (OSError, httpx.TransportError) as err:
        raise ConnectionError(f"cannot reach the Hub at {endpoint or api.endpoint}: {type(err).__name__}; check the "
                              "network or HF_ENDPOINT") from None
    return {"repo_id": repo_id, "url": str(url), "commit": getattr(commit, "oid", str(commit)), "files": files}


@dataclass
class ExportConfig:
    """Write a Hub-ready folder (weights, config, processor, model card); push uploads it."""

    POSITIONAL = ("checkpoint", "out")
    checkpoint: str
    """checkpoint folder (output of desta train)"""
    out: str
    """folder to write"""
    full: bool = False
    """the whole model, LoRA merged: no base checkpoint needed to load it"""
    encoder_id: str | None = None
    """Hub id of the Whisper base to name in the config (instead of a local path)"""
    llm_id: str | None = None
    """Hub id of the LLM base to name in the config"""
    license: str = "other"
    """license in the model card (follow the base models')"""
    report: str | None = None
    """desta eval output folder (or its report.json) whose table goes in the model card"""
    push: str | None = None
    """upload to this Hub repository id"""
    private: bool = False
    """create the repository as private"""
    dry_run: bool = False
    """with push: list what would be uploaded, send nothing"""
    overwrite: bool = False
    """replace out when it already holds an export"""

    def __post_init__(self) -> None:
        if (self.private or self.dry_run) and not self.push:
            raise_problems([("push", "private and dry_run only apply with push=REPO_ID")])


def export_command(config: ExportConfig) -> Summary:
    """Export, then push when asked; returns the folder, its size and what was (or would be) uploaded."""
    folder = export(config.checkpoint, config.out, full=config.full, encoder_id=config.encoder_id,
                    llm_id=config.llm_id, license=config.license, report=config.report, overwrite=config.overwrite)
    result: dict[str, Any] = {"folder": str(folder), "bytes": sum(s for _, s in files_to_upload(folder)),
                              "full": config.full}
    lines = [f"exported {config.checkpoint} -> {folder} ({result['bytes'] / 2**20:.1f} MiB, "
             f"{'full model' if config.full else 'trainable weights only'})"]
    if config.push:
        pushed = result["push"] = push(folder, config.push, private=config.private, dry_run=config.dry_run)
        lines += [f"  {'would upload' if config.dry_run else 'uploaded'} {name} ({size:,} bytes)"
                  for name, size in pushed["files"]]
        lines += [] if config.dry_run else [f"pushed to {pushed['url']}"]
    return Summary(result, "\n".join(lines))
