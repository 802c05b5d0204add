"""The views of redundancy tables (analysis/plots.py): 95% bands over samples, the log-SNR axis, per-head heat maps,
singular-value spectra of kept maps and several tables in one figure, each checked against an answer known by
hand."""

from __future__ import annotations

import json
import math
import shutil

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import PolyCollection, QuadMesh  # noqa: E402

from analysis import plots  # noqa: E402
from analysis.cli import PLOT_AXES, PLOT_VIEWS, main  # noqa: E402
from analysis.collect import COLUMNS, CollectionConfig, collect_redundancy, write_table  # noqa: E402
from mediator_models import build_model  # noqa: E402
from mediator_models.recording.recorder import RunningStats  # noqa: E402
from mediator_models.sampling.diffusion import GaussianDiffusion  # noqa: E402
from mediator_models.sampling.generation import ProcessConfig, SamplerConfig  # noqa: E402
from mediator_models.sampling.transport import Transport  # noqa: E402

T_975_4 = 2.7764451051977987  # Student's t, 97.5% quantile, 4 degrees of freedom (tables)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _table(
    value=lambda step, layer, head: 0.1 * step + layer + 0.01 * head,
    *,
    model="SiT-T/2",
    attention="full",
    mediators=0,
    steps=4,
    layers=2,
    heads=2,
    metrics=("jsd",),
    std=0.0,
    count=8,
):
    """A hand-made redundancy table: noise levels 0.9 → 0.1 over `steps` (SiT's linear interpolant: t = 1 − level),
    every head and their average (head −1, the mean of the heads' values)."""
    levels = np.linspace(0.9, 0.1, steps)
    rows = []
    for metric in metrics:
        for step, level in enumerate(levels):
            for layer in range(layers):
                values = [value(step, layer, head) for head in range(heads)]
                for head, mean in [*enumerate(values), (-1, float(np.mean(values)))]:
                    rows.append(
                        {
                            "model": model,
                            "attention": attention,
                            "mediators": mediators,
                            "network": f"{model} ({attention})",
                            "step": step,
                            "noise_level": float(level),
                            "model_time": float(1 - level),
                            "layer": layer,
                            "head": head,
                            "branch": "all",
                            "metric": metric,
                            "mean": mean,
                            "std": std,
                            "count": count,
                        }
                    )
    return pd.DataFrame(rows)[COLUMNS]


def _bands(ax) -> list[np.ndarray]:
    """The (x, y) vertices of each band drawn on `ax` (fill_between)."""
    return [c.get_paths()[0].vertices for c in ax.collections if isinstance(c, PolyCollection)]


def _labelled_lines(ax) -> dict[str, matplotlib.lines.Line2D]:
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


# ---- the 95% band over samples ----------------------------------------------------------------------------------


def test_the_band_is_the_t_interval_of_the_mean_of_the_samples_the_recorder_saw():
    """Samples 1, 2, 3, 4, 5 at every step, accumulated as the recorder does: mean 3, s = √2.5, n = 5, so the band
    is 3 ± t(0.975, 4)·√2.5/√5 = 3 ± 1.96324 (t from tables)."""
    stats = RunningStats(1)
    stats.add(torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]]))
    mean, std, count = float(stats.mean()[0]), float(stats.std()[0]), stats.count
    assert (mean, count) == (3.0, 5) and std == pytest.approx(math.sqrt(2.5))
    table = _table(lambda step, layer, head: mean, layers=1, std=std, count=count)
    fig = plots.redundancy_curves(table, "jsd")
    (band,) = _bands(fig.axes[0])
    margin = T_975_4 * math.sqrt(2.5) / math.sqrt(5)
    np.testing.assert_allclose(sorted(set(np.round(band[:, 1], 9))), [3 - margin, 3 + margin], atol=1e-9)
    assert margin == pytest.approx(1.963243, abs=1e-6)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "95% interval of the mean over samples, n = 5" in legend


def test_the_band_covers_the_true_mean_in_95_percent_of_simulated_tables():
    """Coverage measured, not assumed: 4000 tables of 8 normal samples each; the share whose band holds the true
    mean is 0.95 within 3 binomial standard deviations (±0.010)."""
    rng = np.random.default_rng(0)
    samples = rng.normal(2.0, 0.5, (4000, 8))
    low, high = plots.sample_band(samples.mean(1), samples.std(1, ddof=1), np.full(4000, 8))
    covered = float(((low <= 2.0) & (2.0 <= high)).mean())
    assert abs(covered - 0.95) < 3 * math.sqrt(0.95 * 0.05 / 4000)


def test_a_single_sample_has_no_band_but_its_curve_is_drawn():
    low, high = plots.sample_band([1.0], [0.0], [1])
    assert np.isnan(low).all() and np.isnan(high).all()
    fig = plots.redundancy_curves(_table(layers=1, count=1), "jsd")
    assert not _bands(fig.axes[0]) and len(_labelled_lines(fig.axes[0])["layer 0"].get_xdata()) == 4


def test_layers_averaged_get_the_band_of_their_average_when_they_move_together():
    """Two layers whose samples move together (layer 1 = layer 0 + 1, the same spread s): the average's spread
    over samples is s, the mean of the layers' spreads, so the pooled band is the exact one; otherwise wider."""
    table = _table(lambda step, layer, head: 2.0 + layer, std=0.4, count=8)
    fig = plots.measure_panels(table, ("jsd",))
    (band,) = _bands(fig.axes[0])
    low, high = plots.sample_band(2.5, 0.4, 8)
    np.testing.assert_allclose(sorted(set(np.round(band[:, 1], 9))), [float(low), float(high)], atol=1e-9)


def test_bands_use_the_smallest_count_and_skip_tables_without_counts():
    table = _table(std=0.3).drop(columns="count")
    fig = plots.measure_panels(table, ("jsd",))
    assert not _bands(fig.axes[0]) and len(fig.axes[0].get_lines()) == 1


# ---- the noise axis and log-SNR --------------------------------------------------------------------------------


def test_log_snr_of_the_linear_interpolant_is_the_closed_form():
    """SiT's linear interpolant (transport.py: α = t, σ = 1 − t, t = 0 noise): log-SNR = 2·log(t / (1 − t)). In the
    convention with t the noise level (α = 1 − t, σ = t) the same map reads 2·log((1 − t)/t)."""
    transport = Transport("linear")
    for t in (0.04, 0.25, 0.5, 0.8, 0.96):
        assert plots.log_snr(transport.noise_level(t)) == pytest.approx(2 * math.log(t / (1 - t)), abs=1e-12)
        assert plots.log_snr(t) == pytest.approx(2 * math.log((1 - t) / t), abs=1e-12)
    gvp = Transport("gvp")  # α = sin(πt/2), σ = cos(πt/2)
    assert plots.log_snr(gvp.noise_level(0.3)) == pytest.approx(2 * math.log(math.tan(math.pi * 0.3 / 2)), abs=1e-12)
    assert plots.log_snr(1.0) == -math.inf and plots.log_snr(0.0) == math.inf  # pure noise, clean data


def test_log_snr_of_dits_variance_preserving_process_is_the_closed_form():
    """DiT's DDPM (1000 linear betas 1e-4 → 0.02, respaced to 250 steps): log-SNR = log(ᾱ / (1 − ᾱ)) at the
    original timestep, ᾱ computed here from the betas, not read from the process."""
    alpha_bar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    diffusion = GaussianDiffusion.dit("250")
    for index in (0, 1, 100, 200, 249):
        timestep = diffusion.timestep_map[index]
        expected = math.log(alpha_bar[timestep] / (1 - alpha_bar[timestep]))
        assert plots.log_snr(diffusion.noise_level(index)) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def _recorded(tmp_path, family: str, keep_maps=None):
    """A tiny table recorded from an untrained SiT (SDE, 3 steps) or DiT (DDPM, 4 steps), written with the
    sidecar `attnmed record` writes (model and process)."""
    torch.manual_seed(0)
    name = f"{family}-T/2"
    model = build_model(name, input_size=8).eval()
    process = ProcessConfig(family)
    sampler = SamplerConfig(kind="sde", steps=3) if family == "SiT" else SamplerConfig(kind="ddpm", steps=4)
    path = tmp_path / f"{family.lower()}.parquet"
    table = collect_redundancy(
        model,
        process,
        sampler,
        CollectionConfig(samples=2, batch_size=1, metrics=("jsd", "entropy", "effective_rank", "energy_rank_0.9")),
        progress=False,
        keep_maps=keep_maps,
        keep_dir=tmp_path / f"{family.lower()}-maps",
    )
    write_table(table, path, {"model": model.config.to_dict(), "process": process.to_dict()})
    return path, table


def test_the_log_snr_of_recorded_rows_is_the_processes_own_alpha_and_sigma(tmp_path):
    """The table's noise level mapped to log-SNR equals 2·log(α/σ) of the process at the row's model time: SiT's
    Transport.alpha_sigma(t), DiT's ᾱ at the timestep. The recorder keeps the model time in float32 (a batch mean of
    what the network is given), so SiT's agrees to 1e-5; the noise level is kept in float64, which is why the axis
    reads it."""
    _, sit = _recorded(tmp_path, "SiT")
    alpha, _, sigma, _ = Transport("linear").alpha_sigma(
        torch.tensor(sit["model_time"].to_numpy(), dtype=torch.float64)
    )
    finite = sit["step"] > 0  # t = 0: α = 0, log-SNR −∞
    np.testing.assert_allclose(
        plots.axis_values(sit[finite], "logsnr"), (2 * torch.log(alpha / sigma)).numpy()[finite.to_numpy()], atol=1e-5
    )
    _, dit = _recorded(tmp_path, "DiT")
    alpha_bar = GaussianDiffusion.dit().alphas_cumprod[dit["model_time"].astype(int).to_numpy()]
    np.testing.assert_allclose(plots.axis_values(dit, "logsnr"), np.log(alpha_bar / (1 - alpha_bar)), atol=1e-9)


def test_every_axis_runs_from_noise_on_the_left_to_data_on_the_right(tmp_path):
    _, dit = _recorded(tmp_path, "DiT")
    for axis in plots.AXES:
        ax = plots.redundancy_curves(dit, "jsd", axis=axis).axes[0]
        left, right = ax.get_xlim()
        noisiest = plots.axis_values(dit[dit["step"] == 0].head(1), axis)[0]
        cleanest = plots.axis_values(dit[dit["step"] == 3].head(1), axis)[0]
        assert (left < right) == (noisiest < cleanest), axis  # DiT's timestep: 999 on the left
    assert "model time" in ax.get_xlabel()


def test_the_pure_noise_step_is_left_off_the_log_snr_axis_and_the_label_says_so():
    table = _table(steps=5)
    table.loc[table["step"] == 0, "noise_level"] = 1.0  # SiT at t = 0: α = 0
    fig = plots.redundancy_heatmap(table, "jsd", axis="logsnr")
    (mesh,) = [c for c in fig.axes[0].collections if isinstance(c, QuadMesh)]
    assert mesh.get_array().shape == (2, 4)  # layers × the 4 finite steps
    assert "1 step at infinite log-SNR" in fig.axes[0].get_xlabel()
    edges = mesh.get_coordinates()[0, :, 0]
    centres = plots.log_snr(np.linspace(0.9, 0.1, 5)[1:])
    assert np.all((edges[:-1] < centres) & (centres < edges[1:]))  # each cell straddles its step's log-SNR


def test_an_unknown_axis_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="choose step, noise .* logsnr .* or t"):
        plots.redundancy_curves(_table(), "jsd", axis="sigma")


# ---- per-head heat maps, ranks and spectra ------------------------------------------------------------------------


def test_head_heat_maps_show_each_heads_own_values_and_their_average():
    full = _table(lambda step, layer, head: 10 * layer + head + 0.01 * step, heads=3)
    mediator = _table(lambda step, layer, head: -1.0, attention="mediator", mediators=4, heads=3)
    fig = plots.head_heatmaps(pd.concat([mediator, full]), "jsd")
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels[:4]] == [
        "SiT-T/2 full, head 0",
        "SiT-T/2 full, head 1",
        "SiT-T/2 full, head 2",
        "SiT-T/2 full, heads averaged",
    ]  # full attention first, whatever the table's order
    assert len(panels) == 8 and panels[4].get_title() == "SiT-T/2 n=4, head 0"
    (mesh,) = [c for c in panels[2].collections if isinstance(c, QuadMesh)]
    expected = np.array([[10 * layer + 2 + 0.01 * step for step in range(4)] for layer in range(2)])
    np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(2, 4), expected)
    (average,) = [c for c in panels[3].collections if isinstance(c, QuadMesh)]
    np.testing.assert_allclose(np.asarray(average.get_array()).reshape(2, 4), expected - 1)  # mean of heads 0-2
    assert mesh.get_clim() == (-1.0, 12.03)  # one colour scale for every panel


def test_rank_curves_draw_one_line_per_head_of_each_rank_measure_and_refuse_tables_without_ranks():
    table = _table(lambda step, layer, head: 1.0 + head, heads=3, metrics=("jsd", "effective_rank", "stable_rank"))
    fig = plots.head_rank_curves(table)
    titled = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in titled] == ["SiT-T/2 full: effective rank", "SiT-T/2 full: stable rank"]
    lines = _labelled_lines(titled[0])
    assert sorted(lines) == ["head 0", "head 1", "head 2"]
    assert list(lines["head 2"].get_ydata()) == [3.0] * 4
    with pytest.raises(ValueError, match="record it with `--metrics all`"):
        plots.head_rank_curves(_table())


def _payload(maps: torch.Tensor, step: int = 0, level: float = 0.5, network: str = "SiT-T/2 (full) @8") -> dict:
    return {"kind": "full", "effective": maps, "network": network, "step": step, "layer": 0, "noise_level": level}


def test_spectra_of_kept_maps_are_their_singular_values():
    """Head 0 holds the identity (σ = 1, 1, 1, 1), head 1 the uniform map (σ = 1, 0, 0, 0: one direction), the same
    in both samples: the mean spectrum is exactly that, with no spread."""
    n = 4
    maps = torch.stack([torch.eye(n), torch.full((n, n), 1 / n)])[None].repeat(2, 1, 1, 1)  # (samples, heads, N, N)
    fig = plots.singular_value_spectra([_payload(maps)])
    head0, head1 = [ax for ax in fig.axes if ax.get_title()]
    assert head1.get_title().endswith("head 1")
    np.testing.assert_allclose(head0.get_lines()[0].get_ydata(), [1, 1, 1, 1], atol=1e-12)
    np.testing.assert_allclose(head1.get_lines()[0].get_ydata(), [1, 0, 0, 0], atol=1e-12)


def test_kept_maps_of_every_batch_are_joined_and_drawn_by_the_plot_command(tmp_path, capsys):
    path, _ = _recorded(tmp_path, "SiT", keep_maps=[(0, 0), (2, 0)])
    maps = plots.read_kept_maps(tmp_path / "sit-maps")  # batch size 1: two parts per (step, layer)
    assert sorted(m["step"] for m in maps) == [0, 2] and all(m["effective"].shape[0] == 2 for m in maps)
    fig = plots.singular_value_spectra(maps)
    assert len([ax for ax in fig.axes if ax.get_title()]) == maps[0]["effective"].shape[1]  # a panel per head
    assert sorted(_labelled_lines(fig.axes[0])) == ["step 0, noise 1.00", "step 2, noise 0.04"]
    capsys.readouterr()
    out = tmp_path / "figures"
    assert main(["plot", str(path), "--views", "heads", "ranks", "spectra", "--out", str(out)]) == 0
    assert {p.rsplit("/", 1)[1] for p in capsys.readouterr().out.split()} == {
        "redundancy_heads.png",
        "ranks_by_head.png",
        "spectra.png",
    }
    bare = tmp_path / "bare.parquet"
    write_table(pd.read_parquet(path), bare, json.loads((tmp_path / "sit.parquet.json").read_text()))
    assert main(["plot", str(bare), "--views", "spectra", "--out", str(tmp_path / "f2")]) == 2
    assert "record the table with `attnmed record --keep-maps STEP:LAYER" in capsys.readouterr().err
    assert not (tmp_path / "f2").exists()


# ---- several tables in one figure -------------------------------------------------------------------------------


def test_two_tables_share_one_figure_each_network_labelled_by_its_table():
    a = pd.concat([_table(), _table(attention="mediator", mediators=4)])
    b = _table(lambda step, layer, head: 5.0, model="DiT-T/2")
    both = plots.combine_tables({"a": a, "b": b})
    fig = plots.comparison_curves(both, "jsd")
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["layer 0", "layer 1"]
    for ax in panels:
        lines = _labelled_lines(ax)
        assert sorted(lines) == ["a: SiT-T/2 full", "a: SiT-T/2 n=4", "b: DiT-T/2 full"]
        assert [lines[k].get_linestyle() for k in sorted(lines)] == ["-", "-", "--"]  # the table, by line style
    assert len(_labelled_lines(plots.measure_panels(both, ("jsd",)).axes[0])) == 3
    heat = plots.redundancy_heatmaps(both, "jsd")
    titles = [ax.get_title() for ax in heat.axes if ax.get_title()]
    assert titles == ["a: SiT-T/2 full", "a: SiT-T/2 n=4", "b: DiT-T/2 full"]  # one row per table
    assert sum(not ax.axison for ax in heat.axes) == 1  # table b's row has one panel: the other is left blank


def test_tables_of_different_processes_are_refused_on_the_t_axis_and_drawn_on_log_snr(tmp_path, capsys):
    sit, _ = _recorded(tmp_path, "SiT")
    dit, _ = _recorded(tmp_path, "DiT")
    capsys.readouterr()
    assert main(["plot", str(sit), str(dit), "--axis", "t", "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "model times are different clocks" in err and "--axis logsnr" in err
    assert "sit: SiT t, linear interpolant (0 = noise)" in err
    assert "dit: DDPM timestep, 1000 linear betas 0.0001–0.02 (999 = noise)" in err
    assert not (tmp_path / "t").exists()
    assert main(["plot", str(sit), str(dit), "--axis", "logsnr", "--out", str(tmp_path / "snr")]) == 0
    written = {p.rsplit("/", 1)[1] for p in capsys.readouterr().out.split()}
    assert written == {"redundancy_heatmaps.png", "redundancy_curves.png", "measures_by_noise.png"}
    both = plots.read_tables([sit, dit], labels=["SiT", "DiT"])
    curves = plots.comparison_curves(both, "jsd", axis="logsnr")
    assert sorted(_labelled_lines(curves.axes[0])) == ["DiT: DiT-T/2 full", "SiT: SiT-T/2 full"]
    again = tmp_path / "again" / "sit.parquet"  # the same process twice: one clock, drawn on t
    again.parent.mkdir()
    shutil.copy(sit, again)
    shutil.copy(f"{sit}.json", f"{again}.json")
    assert (
        "model time: SiT t"
        in plots.comparison_curves(plots.read_tables([sit, again]), "jsd", axis="t").texts[-2].get_text()
    )


def test_tables_whose_process_is_unknown_are_refused_on_the_t_axis():
    both = plots.combine_tables({"a": _table(), "b": _table()}, {"a": "SiT t, linear interpolant (0 = noise)"})
    with pytest.raises(ValueError, match="cannot tell which process made b .* --axis logsnr"):
        plots.comparison_curves(both, "jsd", axis="t")
    plots.comparison_curves(both, "jsd", axis="logsnr")  # one axis for every process


def test_the_clock_of_each_sidecar_names_its_process():
    assert plots.process_clock({"process": {"family": "SiT", "interpolant": "gvp"}}).startswith("SiT t, gvp")
    dit = plots.process_clock({"process": {"family": "DiT"}})
    diffusers = plots.process_clock(
        {
            "scheduler": {
                "_class_name": "DDIMScheduler",
                "beta_schedule": "linear",
                "beta_start": 0.0001,
                "beta_end": 0.02,
            }
        }
    )
    assert dit == diffusers  # attnmed's DiT and a diffusers DiT pipeline share one timestep
    assert plots.process_clock({"study": {"model": "SiT-T/2"}}) == plots.process_clock({"process": {"family": "SiT"}})
    assert plots.process_clock({}) is None


def test_table_labels_tell_tables_of_the_same_name_apart_and_labels_must_match_the_tables(tmp_path):
    assert plots.table_labels(["runs/a/redundancy.parquet", "runs/b/redundancy.parquet"]) == [
        "a/redundancy",
        "b/redundancy",
    ]
    assert plots.table_labels(["x.parquet", "y.csv"]) == ["x", "y"]
    with pytest.raises(ValueError, match="1 labels for 2 tables"):
        plots.read_tables(["x.parquet", "y.parquet"], labels=["one"])


def test_the_plot_command_offers_the_axes_and_views_the_plots_draw():
    assert PLOT_AXES == plots.AXES and PLOT_VIEWS == plots.VIEWS


def test_a_view_the_table_cannot_give_is_refused_before_any_figure_is_written(tmp_path, capsys):
    path = tmp_path / "cheap.parquet"
    write_table(_table(metrics=("jsd", "entropy")), path, {"process": {"family": "SiT"}})
    assert main(["plot", str(path), "--views", "paper", "ranks", "--out", str(tmp_path / "f")]) == 2
    assert "record it with `--metrics all`" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()
