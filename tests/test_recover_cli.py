"""`hf-prune recover FOLDER --data ... --steps N [--distill] [--lora] --output OUT` on a tiny pruned folder with a
character-level tokenizer: it trains, writes a new loadable folder of the pruned shapes, distils from the model
the card names (a student equal to its teacher with α = 1 does not move), merges LoRA, never overwrites, and
refuses bad arguments with exit code 2 and a message naming the option."""

from __future__ import annotations

import re

import pytest
import torch
from tiny_models import FAMILIES, STRUCTURAL
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_prune import HFPruner, PruningConfig, load_pruned
from hf_prune.cli import main
from hf_prune.output.card import recorded_source

pytestmark = pytest.mark.usefixtures("one_thread")

CHARACTERS = "abcdefghijklmnopqrstuvwxyz .,"
TEXT = "the quick brown fox jumps over the lazy dog, again and again. " * 40


def character_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (30 ids, within the tiny models' 97)."""
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(CHARACTERS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(dense folder, pruned folder, text file): the pruned folder's card names the dense one as its source."""
    root = tmp_path_factory.mktemp("recover")
    dense = root / "dense"
    FAMILIES["llama"].build().save_pretrained(dense)
    character_tokenizer().save_pretrained(dense)
    pruner = HFPruner.from_pretrained(dense)
    pruner.prune(PruningConfig(mlp_neurons=0.5, **STRUCTURAL))
    pruner.save_pretrained(root / "pruned")
    text = root / "corpus.txt"
    text.write_text(TEXT)
    return dense, root / "pruned", text


def weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.state_dict().items()}


def errors(capsys) -> str:
    """stderr with the 100-column wrapping undone."""
    return " ".join(capsys.readouterr().err.split())


def recover(folders, output, *options) -> int:
    _, pruned, text = folders
    return main(["recover", str(pruned), "--data", str(text), "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                 "--output", str(output), *options])  # fmt: skip


def test_recover_trains_and_writes_a_new_loadable_folder(folders, tmp_path, capsys):
    _, pruned, _ = folders
    assert recover(folders, tmp_path / "out", "--learning-rate", "1e-2") == 0
    before, after = weights(load_pruned(pruned)), weights(load_pruned(tmp_path / "out"))
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    assert any(not torch.equal(before[name], after[name]) for name in before)  # two steps moved the weights
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "## Recovery" in readme and "2 optimizer steps × 2 windows of 16 tokens" in readme
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert "recovered" in capsys.readouterr().out


def test_distillation_reads_the_teacher_from_the_card_and_a_student_equal_to_its_teacher_does_not_move(
    folders, tmp_path
):
    dense, pruned, _ = folders
    assert recorded_source(pruned) == str(dense)
    # The card's teacher (the dense model): the KD term is positive, training moves the weights.
    assert recover(folders, tmp_path / "a", "--distill", "--learning-rate", "1e-2") == 0
    assert "distillation from" in (tmp_path / "a" / "README.md").read_text()
    # α = 1 and the pruned model as its own teacher: KL(p ‖ p) = 0, zero gradient, Adam leaves every weight.
    options = ("--distill", "--teacher", str(pruned), "--alpha", "1", "--learning-rate", "1e-2")
    assert recover(folders, tmp_path / "b", *options) == 0
    before, after = weights(load_pruned(pruned)), weights(load_pruned(tmp_path / "b"))
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=1e-7, msg=name)


def test_lora_is_merged_into_the_pruned_shapes(folders, tmp_path):
    _, pruned, _ = folders
    assert recover(folders, tmp_path / "out", "--lora", "--learning-rate", "1e-2") == 0
    before, after = weights(load_pruned(pruned)), weights(load_pruned(tmp_path / "out"))
    assert set(after) == set(before)  # no adapter weights: merged
    assert any(not torch.equal(before[name], after[name]) for name in before)


@pytest.mark.parametrize(
    "options, message",
    [
        (("--steps", "0"), r"steps=0 must be a positive whole number \(CLI: --steps"),
        (("--teacher", "x"), r"--teacher is read only with --distill"),
        (
            ("--data", "missing.txt"),
            r"data='missing.txt' \(CLI: --data\): calibration path missing.txt does not exist",
        ),
        (("--distill", "--teacher", "no-such-folder"), r"the teacher 'no-such-folder' cannot be loaded"),
    ],
)
def test_bad_arguments_exit_2_naming_the_option(folders, tmp_path, capsys, options, message):
    assert recover(folders, tmp_path / "out", *options) == 2
    assert re.search(message, errors(capsys))
    assert not (tmp_path / "out").exists()


def test_never_overwrites(folders, tmp_path, capsys):
    _, pruned, _ = folders
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert recover(folders, tmp_path / "out") == 2
    assert "exists and is not empty" in errors(capsys)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert recover(folders, pruned) == 2
    assert "never overwrites" in errors(capsys)


def test_distill_without_a_recorded_base_asks_for_teacher(folders, tmp_path, capsys):
    _, pruned, text = folders
    bare = tmp_path / "bare"
    bare.mkdir()
    for item in pruned.iterdir():
        if item.name != "README.md":
            (bare / item.name).write_bytes(item.read_bytes())
    code = main(
        ["recover", str(bare), "--data", str(text), "--steps", "1", "--distill", "--output", str(tmp_path / "o")]
    )
    assert code == 2
    assert "pass the dense model as --teacher" in errors(capsys)
