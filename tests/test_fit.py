"""`--fit SIZE` on generate / story / enhance (longvideo/cli/_fit.py), through the CLI's main()
on the tiny models: the planner's choice is printed in one line and applied; nothing fitting is
refused in one line before anything is generated.

The sizes are derived from the planner's own candidates for the same run (so a change of the
planner's numbers moves them with it): a size between the "text offload" peak and the
"everything resident" peak must choose text offload.
"""
import json

import numpy as np
import pytest

from longvideo.cli import main

HEADROOM = 0.95   # the planner's default: a setting fits when its peak <= 95% of --fit
FREELOC = ["generate", "--method", "freeloc", "--device", "cpu", "--num-frames", "17", "--steps", "1"]


@pytest.fixture
def offload_calls(monkeypatch):
    """The (pipe, mode) of every enable_offload call the command makes (the real function runs)."""
    import longvideo.offload as O

    calls = []
    real = O.enable_offload

    def spy(pipe, mode, device):
        calls.append((pipe, mode))
        return real(pipe, mode, device)

    monkeypatch.setattr(O, "enable_offload", spy)
    return calls


def _freeloc_candidates():
    from longvideo.models import wan
    from longvideo.planner import plan, spec_from_pipeline

    pipe = wan.tiny_pipeline("t2v")
    p = plan("freeloc", spec_from_pipeline(pipe, name="tiny model"), 32, 32, 17, "float32", device="cpu",
             gpu_memory=1, num_inference_steps=1, trained_frames=3)
    return {c.settings.describe(): c.peak for c in p.candidates}


def test_generate_fit_chooses_and_applies_text_offload(tmp_path, capsys, offload_calls):
    from longvideo.video import read_video

    peaks = _freeloc_candidates()
    resident, text = peaks["offload=none"], peaks["offload=text, vae_tiling"]
    assert text < resident
    size = f"{int((text + resident) / 2 / HEADROOM)}B"    # fits text offload, not everything resident
    assert main(FREELOC + ["--out", str(tmp_path / "fit.mp4"), "--fit", size]) == 0
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if ln.startswith(f"fit {size}:")]
    assert len(line) == 1 and "offload=text, vae_tiling" in line[0], out
    (pipe, mode), = offload_calls
    assert mode == "text" and pipe.vae.use_tiling and hasattr(pipe.text_encoder, "_hf_hook")
    # the settings move weights and tile a 32x32 decode (one tile): the video is the plain run's
    assert main(FREELOC + ["--out", str(tmp_path / "plain.mp4")]) == 0
    np.testing.assert_array_equal(read_video(tmp_path / "fit.mp4"), read_video(tmp_path / "plain.mp4"))


def test_generate_fit_everything_resident_when_it_fits(tmp_path, capsys, offload_calls):
    assert main(FREELOC + ["--out", str(tmp_path / "a.mp4"), "--fit", "24GB"]) == 0
    assert "fit 24GB: offload=none (predicted peak" in capsys.readouterr().out
    assert [m for _, m in offload_calls] == ["none"]


# a size nothing fits in is refused by the planner; a size without a known unit at parse time
@pytest.mark.parametrize("size,message", [("1MB", "--fit 1MB: nothing tried fits in"),
                                          ("12XB", "argument --fit: expected a size with its unit"),
                                          ("16171130", "(bytes? write e.g. 24GB")])
def test_generate_fit_refused_in_one_line(tmp_path, capsys, size, message):
    assert main(FREELOC + ["--out", str(tmp_path / "x.mp4"), "--fit", size]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("longvideo: error:") and message in err and repr(size) * (size != "1MB") in err
    assert "\n" not in err
    assert not (tmp_path / "x.mp4").exists()


def test_fifo_fit(tmp_path, capsys, offload_calls):
    assert main(["generate", "--method", "fifo", "--device", "cpu", "--num-frames", "5", "--out",
                 str(tmp_path / "f.mp4"), "--fit", "24GB"]) == 0
    assert "fit 24GB: offload=none" in capsys.readouterr().out
    assert [m for _, m in offload_calls] == ["none"] and (tmp_path / "f.mp4").exists()


def test_story_fit_sets_the_bank_budget(tmp_path, capsys, monkeypatch):
    from longvideo.methods import storydiffusion as S

    budgets = []
    real = S.StoryDiffusion.__init__

    def spy(self, pipe, *a, **k):
        budgets.append((k.get("bank_location"), k.get("bank_gpu_budget")))
        return real(self, pipe, *a, **k)

    monkeypatch.setattr(S.StoryDiffusion, "__init__", spy)
    f = tmp_path / "story.txt"
    f.write_text("[Bob] at home\n[Bob] in a park\n[Bob] with a dog\n")
    assert main(["story", str(f), "--out", str(tmp_path / "s"), "--steps", "1", "--story-id-length", "2",
                 "--device", "cpu", "--fit", "24GB"]) == 0
    assert "fit 24GB: offload=none" in capsys.readouterr().out
    assert budgets == [("auto", int(0.1 * 24e9))]        # 10% of --fit, not of the machine's card
    assert json.loads((tmp_path / "s" / "story.json").read_text())["panels"]


def test_enhance_fit(tmp_path, capsys):
    from longvideo.video import write_video

    src = tmp_path / "in.mp4"
    t = np.linspace(0, 1, 13)[:, None, None, None]
    write_video(src, (255 * (0.5 + 0.4 * np.sin(np.arange(32)[None, None, :, None] / 4 + 3 * t))
                      * np.ones((13, 32, 32, 3))).astype(np.uint8), fps=8)
    assert main(["enhance", str(src), "--out", str(tmp_path / "e.mp4"), "--steps", "2", "--device", "cpu",
                 "--fit", "24GB"]) == 0
    assert "fit 24GB: offload=none" in capsys.readouterr().out


@pytest.fixture
def planned(monkeypatch):
    """The keyword arguments of every planner call --fit makes (the real planner runs)."""
    import longvideo.planner as P

    calls = []
    real = P.plan

    def spy(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(P, "plan", spy)
    return calls


def _stub_world(monkeypatch, n):
    """Under torchrun with a world of `n` (its process group stubbed: --fit refuses before any
    collective runs)."""
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", str(n))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: n)


@pytest.mark.parametrize("argv,world,ranks", [
    (FREELOC, 1, 1),                                                   # one process: the whole sequence
    (FREELOC, 2, 2),                                                   # torchrun: the sequence over the world
    (["generate", "--method", "fifo", "--device", "cpu", "--num-frames", "5"], 2, 1),   # windows split only
    (["generate", "--method", "fifo", "--device", "cpu", "--num-frames", "5", "--context-parallel", "2"], 2, 2),
    # Wan 2.2 A14B: both experts split the same way
    (["generate", "--method", "fifo", "--fifo-family", "wan22", "--device", "cpu", "--num-frames", "5",
      "--context-parallel", "2"], 2, 2),
])
def test_fit_plans_one_ranks_share_under_context_parallel(tmp_path, capsys, monkeypatch, planned, argv, world, ranks):
    """--fit asks the planner for one rank's peak when the run splits the sequence (FreeLOC / direct
    under torchrun over the whole world; FIFO with --context-parallel N), the whole sequence
    otherwise; a size nothing fits in is then refused in one line."""
    if world > 1:
        _stub_world(monkeypatch, world)
    else:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(argv + ["--out", str(tmp_path / "x.mp4"), "--fit", "1MB"]) == 2
    assert [kw.get("context_parallel", 1) for kw in planned] == [ranks]
    err = capsys.readouterr().err.strip()
    assert err.startswith("longvideo: error: --fit 1MB:") and "\n" not in err


OUROBOROS_CP = ["generate", "--method", "ouroboros", "--device", "cpu", "--num-frames", "5", "--context-parallel", "2"]


def test_fit_plans_ouroboros_processors_per_rank_under_context_parallel(tmp_path, capsys, monkeypatch, planned):
    """Ouroboros with SACFA and self-recurrent guidance under `torchrun ... --context-parallel 2`
    (a stubbed world of 2): --fit plans one rank's share with the processors on (it refused them
    before the planner modelled them) -- a size nothing fits in is refused as not fitting, not as
    unplannable; a size that fits is chosen and said to be per rank, and the run goes on to split
    the windows (stopped there: the stub has no collectives)."""
    from longvideo.cli import generate_fifo

    class Stopped(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stopped

    _stub_world(monkeypatch, 2)
    assert main(OUROBOROS_CP + ["--out", str(tmp_path / "x.mp4"), "--fit", "1MB"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("longvideo: error: --fit 1MB: nothing tried fits") and "\n" not in err, err
    monkeypatch.setattr(generate_fifo, "_context_parallel", stop)
    with pytest.raises(Stopped):
        main(OUROBOROS_CP + ["--out", str(tmp_path / "x.mp4"), "--fit", "1TB"])
    out = capsys.readouterr().out
    assert "fit 1TB: offload=none (predicted peak per rank, one of 2 context-parallel ranks," in out, out
    assert len(planned) == 2
    assert all(kw["context_parallel"] == 2 and kw["sacfa"] and kw["guidance"] for kw in planned), planned


def test_readme_fit_table_is_the_planners():
    """The README's fit table is what `python tools/fit_table.py` prints now (a planner change
    that moves a prediction must regenerate it with `--readme`; it went stale once)."""
    import importlib.util
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("fit_table", root / "tools" / "fit_table.py")
    fit_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fit_table)
    readme = (root / "README.md").read_text()
    m = re.search(r"<!-- fit-table:begin -->\n(.*?)\n<!-- fit-table:end -->", readme, re.S)
    assert m is not None, "README.md lost its fit-table markers"
    assert m.group(1) == fit_table.table(), "README fit table is stale: run python tools/fit_table.py --readme"


def test_fit_table_adds_the_measured_peak_of_a_memory_record(tmp_path):
    """A GPU record of the memory suite (benchmarks/bench_memory.py) puts its measured peak in the
    fit-table cell of its target and size, and only there; CPU / quick records and unfinished
    cases are not used."""
    import importlib.util
    import json
    from pathlib import Path

    from longvideo.benchmarks import bench_memory

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("fit_table", root / "tools" / "fit_table.py")
    fit_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fit_table)
    target = {t.method: t for t in bench_memory.targets(False)}["story"]
    plan_of = {"method": target.method, **target.plan_kwargs, "fit": target.size}
    case = next(c for label, c in fit_table.CASES if c["method"] == "story")
    settings = fit_table.cell(case, target.size).split(" (")[0]

    def record(name, device_type, quick, status, peak):
        row = {"name": target.key, "memory": {"target_plan": plan_of, "status": status, "measured_peak_bytes": peak,
                                              "fits": True, "settings_described": settings}}
        rec = {"suite": "memory", "quick": quick, "cases": [row],
               "environment": {"device_type": device_type, "device": "NVIDIA H200", "date": name}}
        (tmp_path / f"memory_{name}.json").write_text(json.dumps(rec))

    record("2026-01-01", "cuda", False, "ok", 9 * 2**30)
    record("2026-01-02", "cpu", True, "ok", 1)                 # quick CPU run: ignored
    record("2026-01-03", "cuda", False, "interrupted", 5)     # unfinished: ignored
    measured = fit_table.measured_targets(tmp_path)
    assert len(measured) == 1
    got = fit_table.cell(case, target.size, measured)
    assert got.endswith("; measured 9.00 GiB on NVIDIA H200, fits)") and got.startswith(settings), got
    other = "24GB" if target.size != "24GB" else "16GB"
    assert "measured" not in fit_table.cell(case, other, measured)
