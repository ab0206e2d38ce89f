"""Training-free repairs on constructed cases: bias compensation and i-SpaSP selection."""

import copy

import pytest
import torch
from tiny_models import FAMILIES, calibration_windows

from hf_prune import HFPruner, PruningConfig
from hf_prune.allocation import build_plan, resolve_counts
from hf_prune.calibration.statistics import collect_statistics
from hf_prune.criteria import ScoringContext, get_criterion
from hf_prune.errors import InvalidPruningTargetError
from hf_prune.masking import apply_masks
from hf_prune.plan import PruningPlan
from hf_prune.repair.bias import fold_constant_into_columns
from hf_prune.repair.ispasp import least_squares_columns, output_error, select
from hf_prune.repair.least_squares import reconstruct

pytestmark = pytest.mark.usefixtures("one_thread")


def gram_of(x: torch.Tensor) -> torch.Tensor:
    return (x.T @ x / len(x)).double()


def test_a_constant_folds_exactly_into_a_kept_constant_channel():
    x = torch.randn(500, 6, generator=torch.Generator().manual_seed(0)).double()
    x[:, 2] = 1.0  # a kept channel that is always on can stand in for a bias
    constant = torch.tensor([3.0, -1.0], dtype=torch.float64)
    delta = fold_constant_into_columns(constant, x.mean(0), gram_of(x), damping=0.0)
    torch.testing.assert_close(x @ delta.T, constant.expand(500, 2))


def test_a_removed_constant_channel_is_given_back_exactly_as_a_bias():
    model = FAMILIES["gpt2"].build()
    adapter = HFPruner(model).adapter
    windows = calibration_windows()[0]
    with torch.no_grad():  # neuron 5 of layer 0 always outputs 5: FLAP's ideal case
        model.transformer.h[0].mlp.act = ConstantNeuron(model.transformer.h[0].mlp.act, 5, 5.0)
    dense_logits = model(windows).logits
    stats = collect_statistics(model, adapter, windows.split(4), {"moments"})
    plan = PruningPlan.keep_all(model, adapter)
    plan.layers[0].neurons = tuple(n for n in plan.layers[0].neurons if n != 5)
    repaired = copy.deepcopy(model)
    reconstruct(repaired, adapter, plan, stats, "bias")
    apply_masks(repaired, adapter, plan)
    plain = copy.deepcopy(model)
    apply_masks(plain, adapter, plan)
    with torch.no_grad():
        repaired_error = (repaired(windows).logits - dense_logits).abs().max()
        plain_error = (plain(windows).logits - dense_logits).abs().max()
    assert repaired_error < 1e-4 and plain_error > 1e-2


class ConstantNeuron(torch.nn.Module):
    """The MLP activation with one neuron pinned to a constant."""

    def __init__(self, activation: torch.nn.Module, neuron: int, value: float):
        super().__init__()
        self.activation, self.neuron, self.value = activation, neuron, value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.activation(x).clone()
        out[..., self.neuron] = self.value
        return out


def test_bias_on_bias_free_consumers_keeps_the_vanilla_format_and_the_mean_output():
    dense = FAMILIES["llama"].build()
    pruner = HFPruner(copy.deepcopy(dense))
    windows = calibration_windows()
    report = pruner.prune(
        mlp_neurons=0.5, kv_groups=1, criterion="fluctuation", reconstruct="bias", calibration=windows
    )
    assert report.output_format == "vanilla"
    assert set(pruner.model.state_dict()) == set(dense.state_dict())
    stats = collect_statistics(dense, pruner.adapter, windows[0].split(4), {"moments", "mlp_gram"})
    for index, layer in enumerate(dense.model.layers):
        kept = torch.tensor(pruner.plan.layers[index].neurons)
        mean = stats.consumers[(index, "mlp")].mean
        dense_mean = layer.mlp.down_proj.weight.double() @ mean
        repaired = pruner.model.model.layers[index].mlp.down_proj.weight.double() @ mean[kept]
        unrepaired = layer.mlp.down_proj.weight.double()[:, kept] @ mean[kept]
        assert (repaired - dense_mean).norm() < 0.5 * (unrepaired - dense_mean).norm()


def duplicated_channels(pairs: int = 16, outputs: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A consumer whose input channels `j` and `j + pairs` are identical: keeping one of each pair
    loses nothing, keeping both copies of some pairs loses the others."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(2000, pairs, generator=generator)
    weight = torch.randn(outputs, 2 * pairs, generator=generator).double()
    return weight, gram_of(torch.cat([base, base], dim=1))


def test_ispasp_finds_the_lossless_support_that_a_bad_start_misses():
    weight, gram = duplicated_channels()
    blocks = [torch.tensor([c]) for c in range(32)]
    start = list(range(8)) + list(range(16, 24))  # both copies of pairs 0-7, nothing of pairs 8-15
    kept = torch.tensor(start)
    start_error = output_error(weight, gram, kept, least_squares_columns(weight, gram, kept))
    chosen = select(weight, gram, blocks, start)
    chosen_tensor = torch.tensor(chosen)
    error = output_error(weight, gram, chosen_tensor, least_squares_columns(weight, gram, chosen_tensor))
    assert len(chosen) == 16 and {c % 16 for c in chosen} == set(range(16))
    assert error < 1e-3 * start_error


@pytest.mark.parametrize("amounts", [{"mlp_neurons": 0.5}, {"kv_groups": 1}])
def test_ispasp_reduces_the_calibration_output_error_at_least_as_much_as_lstsq(amounts):
    model = FAMILIES["qwen2"].build()
    adapter = HFPruner(model).adapter
    stats = collect_statistics(model, adapter, calibration_windows()[0].split(4), {"moments", "mlp_gram"})
    targets = resolve_counts(model, adapter, PruningConfig(**amounts))
    plan = build_plan(
        ScoringContext(model, adapter, stats),
        dict.fromkeys(["neurons", "kv_groups"], get_criterion("activation")),
        targets,
    )
    branch, name = ("mlp", "mlp.down_proj") if "mlp_neurons" in amounts else ("attention", "self_attn.o_proj")
    errors = {}
    for method in ("lstsq", "ispasp"):
        repaired = copy.deepcopy(model)
        final = reconstruct(repaired, adapter, plan, stats, method)
        apply_masks(repaired, adapter, final)
        errors[method] = [
            output_error(
                layer.get_submodule(name).weight.detach().double(),
                stats.consumers[(index, branch)].gram / stats.consumers[(index, branch)].count,
                torch.arange(layer.get_submodule(name).weight.shape[1]),
                adapter.layers(repaired)[index].get_submodule(name).weight.detach().double(),
            )
            for index, layer in enumerate(adapter.layers(model))
        ]
    assert all(i <= lstsq * (1 + 1e-6) for i, lstsq in zip(errors["ispasp"], errors["lstsq"]))
    assert sum(errors["ispasp"]) < sum(errors["lstsq"])


def test_ispasp_is_deterministic_keeps_the_counts_and_surgery_equals_the_masked_model():
    dense = FAMILIES["llama"].build()
    windows = calibration_windows()

    def pruned():
        pruner = HFPruner(copy.deepcopy(dense))
        pruner.prune(mlp_neurons=0.5, kv_groups=1, criterion="activation", reconstruct="ispasp", calibration=windows)
        return pruner

    first, again = pruned(), pruned()
    assert [p.to_dict() for p in first.plan.layers] == [p.to_dict() for p in again.plan.layers]
    assert all(len(p.neurons) == 24 and len(p.kv_heads) == 2 for p in first.plan.layers)
    reference = copy.deepcopy(dense)
    stats = collect_statistics(reference, first.adapter, windows[0].split(8), {"moments", "mlp_gram"})
    plan = reconstruct(reference, first.adapter, first.plan, stats, "lstsq")
    apply_masks(reference, first.adapter, plan)
    ids = windows[0][:2]
    with torch.no_grad():
        torch.testing.assert_close(first.model(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)


def test_prune_passes_damping_to_the_refit_and_a_smaller_one_fits_the_calibration_output_closer():
    dense = FAMILIES["llama"].build()
    adapter = HFPruner(dense).adapter
    windows = calibration_windows()
    stats = collect_statistics(dense, adapter, windows[0].split(4), {"moments", "mlp_gram"})
    errors = {}
    for damping in (1e-4, 0.3):
        pruner = HFPruner(copy.deepcopy(dense))
        pruner.prune(mlp_neurons=0.5, criterion="activation", calibration=windows, damping=damping)
        errors[damping] = sum(
            output_error(
                layer.mlp.down_proj.weight.detach().double(),
                stats.consumers[(index, "mlp")].gram / stats.consumers[(index, "mlp")].count,
                torch.tensor(pruner.plan.layers[index].neurons),
                adapter.layers(pruner.model)[index].mlp.down_proj.weight.detach().double(),
            )
            for index, layer in enumerate(adapter.layers(dense))
        )
    assert errors[1e-4] < 0.9 * errors[0.3]


@pytest.mark.parametrize("damping", [0, -1e-3, 1.0, True])
def test_a_damping_outside_zero_to_one_is_refused_with_its_name(damping):
    with pytest.raises(InvalidPruningTargetError, match=rf"damping={damping!r} must be a float in \(0, 1\)"):
        PruningConfig(damping=damping)
