"""Memory probes against fake /proc and /sys/fs/cgroup trees (v1, v2, hybrid), PSI, the process
tree, and GPUs through a fake NVML; plus sanity checks on the real machine."""

from __future__ import annotations

import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from fakes import FakeNvml

from optuna_guard._units import GB, MB
from optuna_guard.memory import SystemProbe, gpu_memory, process_tree_rss, system_memory
from optuna_guard.memory._cgroup import parse_proc_cgroup
from optuna_guard.memory._gpu import GpuReader
from optuna_guard.memory._procfs import PAGE_SIZE, parse_meminfo, parse_psi

HOST_TOTAL = 64 * GB
HOST_AVAILABLE = 60 * GB


def _write(path, text) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def make_proc(
    tmp_path,
    *,
    cgroup="0::/\n",
    total=HOST_TOTAL,
    available=HOST_AVAILABLE,
    swap_total=0,
    swap_free=0,
    psi=None,
    meminfo=None,
):
    proc = tmp_path / "proc"
    if meminfo is None:
        meminfo = (
            f"MemTotal:       {total // 1024} kB\n"
            f"MemFree:        {available // 2048} kB\n"
            f"MemAvailable:   {available // 1024} kB\n"
            "Buffers:          1024 kB\n"
            f"SwapTotal:      {swap_total // 1024} kB\n"
            f"SwapFree:       {swap_free // 1024} kB\n"
        )
    _write(proc / "meminfo", meminfo)
    _write(proc / "self" / "cgroup", cgroup)
    if psi is not None:
        _write(proc / "pressure" / "memory", psi)
    return str(proc)


def v2_level(
    root, rel, *, limit="max", current=None, inactive=0, swap_max=None, swap_current=None
):
    directory = root / rel if rel else root
    directory.mkdir(parents=True, exist_ok=True)
    if rel:
        _write(directory / "memory.max", f"{limit}\n")
        _write(directory / "memory.current", f"{current or 0}\n")
        _write(
            directory / "memory.stat",
            f"anon 1234\nfile 99\nactive_file 5\ninactive_file {inactive}\nslab 7\n",
        )
        if swap_max is not None:
            _write(directory / "memory.swap.max", f"{swap_max}\n")
            _write(directory / "memory.swap.current", f"{swap_current or 0}\n")
    return directory


def make_v2_root(tmp_path):
    root = tmp_path / "cgroup"
    _write(root / "cgroup.controllers", "cpuset cpu io memory pids\n")
    return root


def v1_level(root, rel, *, limit=9223372036854771712, usage=0, inactive_own=0, inactive_total=0):
    directory = root / "memory" / rel if rel else root / "memory"
    directory.mkdir(parents=True, exist_ok=True)
    _write(directory / "memory.limit_in_bytes", f"{limit}\n")
    _write(directory / "memory.usage_in_bytes", f"{usage}\n")
    _write(
        directory / "memory.stat",
        f"cache 100\nrss 200\ninactive_file {inactive_own}\nactive_file 3\n"
        f"hierarchical_memory_limit {limit}\ntotal_cache 100\ntotal_inactive_file {inactive_total}\n",
    )
    return directory


# -- parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, v1, v2",
    [
        ("0::/user.slice/session-3.scope\n", None, "/user.slice/session-3.scope"),
        (
            "9:name=systemd:/\n4:memory:/process_api/d2b2\n3:cpuset:/\n0::/\n",
            "/process_api/d2b2",
            "/",
        ),
        ("7:memory,hugetlb:/docker/abc\n", "/docker/abc", None),
        ("5:cpu,cpuacct:/x\n", None, None),
        ("garbage\n\n", None, None),
    ],
)
def test_parse_proc_cgroup(text, v1, v2) -> None:
    paths = parse_proc_cgroup(text)
    assert (paths.v1_memory, paths.v2) == (v1, v2)


def test_parse_psi_some_and_full() -> None:
    data = b"some avg10=1.50 avg60=0.20 avg300=0.00 total=123\nfull avg10=0.25 avg60=0.00 avg300=0.00 total=45\n"
    assert parse_psi(data) == (1.5, 0.25)
    assert parse_psi(b"some avg10=3.00 avg60=0.00 avg300=0.00 total=1\n") == (3.0, None)


def test_meminfo_without_memavailable_is_estimated() -> None:
    info = parse_meminfo(
        b"MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 50 kB\nCached: 200 kB\nSwapTotal: 0 kB\n"
    )
    assert info.total_bytes == 1000 * 1024
    assert info.available_bytes == 350 * 1024


# -- host and PSI -------------------------------------------------------------------------------


def test_host_numbers_without_any_cgroup(tmp_path) -> None:
    proc = make_proc(
        tmp_path,
        swap_total=8 * GB,
        swap_free=6 * GB,
        psi="some avg10=2.50 avg60=1.00 avg300=0.10 total=9\nfull avg10=0.50 avg60=0.00 avg300=0.00 total=1\n",
    )
    reading = SystemProbe(proc_root=proc, cgroup_root=str(tmp_path / "no-cgroupfs")).system()
    assert reading.source == "host"
    assert reading.total_bytes == HOST_TOTAL
    assert reading.available_bytes == HOST_AVAILABLE
    assert reading.used_bytes == HOST_TOTAL - HOST_AVAILABLE
    assert reading.percent == pytest.approx(6.2, abs=0.05)
    assert (reading.swap_total_bytes, reading.swap_used_bytes, reading.swap_percent) == (
        8 * GB,
        2 * GB,
        25.0,
    )
    assert (reading.psi_some_avg10, reading.psi_full_avg10) == (2.5, 0.5)


def test_missing_psi_is_none_not_an_error(tmp_path) -> None:
    reading = SystemProbe(
        proc_root=make_proc(tmp_path), cgroup_root=str(tmp_path / "none")
    ).system()
    assert reading.psi_some_avg10 is None and reading.psi_full_avg10 is None


def test_readings_follow_file_changes(tmp_path) -> None:
    proc = make_proc(tmp_path)
    probe = SystemProbe(proc_root=proc, cgroup_root=str(tmp_path / "none"))
    assert probe.system().available_bytes == HOST_AVAILABLE
    make_proc(tmp_path, available=3 * GB)  # rewritten in place: the cached descriptor sees it
    assert probe.system().available_bytes == 3 * GB


# -- cgroup v2 ----------------------------------------------------------------------------------


def test_v2_limit_below_host_gives_cgroup_headroom_without_page_cache(tmp_path) -> None:
    root = make_v2_root(tmp_path)
    v2_level(root, "kubepods", limit="max", current=10 * GB)
    v2_level(root, "kubepods/pod1", limit=4 * GB, current=3 * GB, inactive=1 * GB)
    v2_level(root, "kubepods/pod1/ctr", limit="max", current=3 * GB, inactive=1 * GB)
    proc = make_proc(tmp_path, cgroup="0::/kubepods/pod1/ctr\n")
    reading = SystemProbe(proc_root=proc, cgroup_root=str(root)).system()
    assert reading.source == "cgroup v2"
    assert reading.total_bytes == 4 * GB
    assert reading.used_bytes == 2 * GB  # 3 GB current - 1 GB inactive page cache
    assert reading.available_bytes == 2 * GB
    assert reading.percent == 50.0


def test_v2_max_everywhere_means_host(tmp_path) -> None:
    root = make_v2_root(tmp_path)
    v2_level(root, "a", limit="max", current=GB)
    v2_level(root, "a/b", limit="max", current=GB)
    reading = SystemProbe(
        proc_root=make_proc(tmp_path, cgroup="0::/a/b\n"), cgroup_root=str(root)
    ).system()
    assert reading.source == "host"
    assert reading.available_bytes == HOST_AVAILABLE


def test_v2_limit_above_host_ram_is_ignored(tmp_path) -> None:
    root = make_v2_root(tmp_path)
    v2_level(root, "big", limit=128 * GB, current=100 * GB)
    reading = SystemProbe(
        proc_root=make_proc(tmp_path, cgroup="0::/big\n"), cgroup_root=str(root)
    ).system()
    assert reading.source == "host"
    assert reading.total_bytes == HOST_TOTAL


def test_v2_nested_limits_smallest_wins(tmp_path) -> None:
    root = make_v2_root(tmp_path)
    v2_level(root, "job", limit=8 * GB, current=1 * GB)
    v2_level(root, "job/step", limit=2 * GB, current=GB // 2)
    reading = SystemProbe(
        proc_root=make_proc(tmp_path, cgroup="0::/job/step\n"), cgroup_root=str(root)
    ).system()
    assert reading.total_bytes == 2 * GB
    assert reading.available_bytes == 2 * GB - GB // 2


def test_v2_ancestor_with_less_headroom_wins(tmp_path) -> None:
    # siblings already use most of the parent's 4 GB: the child's own 3 GB limit is not reachable
    root = make_v2_root(tmp_path)
    v2_level(root, "slurm/job7", limit=4 * GB, current=3 * GB + GB // 2)
    v2_level(root, "slurm/job7/task0", limit=3 * GB, current=GB // 2)
    reading = SystemProbe(
        proc_root=make_proc(tmp_path, cgroup="0::/slurm/job7/task0\n"), cgroup_root=str(root)
    ).system()
    assert reading.total_bytes == 4 * GB
    assert reading.available_bytes == GB // 2


def test_host_wins_when_it_has_less_than_the_cgroup(tmp_path) -> None:
    root = make_v2_root(tmp_path)
    v2_level(root, "c", limit=16 * GB, current=1 * GB)
    proc = make_proc(tmp_path, cgroup="0::/c\n", available=5 * GB)
    reading = SystemProbe(proc_root=proc, cgroup_root=str(root)).system()
    assert reading.source == "host"
    assert reading.available_bytes == 5 * GB


def test_v2_usage_is_reread_and_limit_is_cached(tmp_path) -> None:
    root = make_v2_root(tmp_path)
    level = v2_level(root, "c", limit=4 * GB, current=1 * GB)
    probe = SystemProbe(proc_root=make_proc(tmp_path, cgroup="0::/c\n"), cgroup_root=str(root))
    assert probe.system().available_bytes == 3 * GB
    (level / "memory.current").write_text(f"{3 * GB}\n")
    assert probe.system().available_bytes == 1 * GB
    (level / "memory.max").write_text("max\n")  # picked up at the next rediscovery, not per sample
    assert probe.system().total_bytes == 4 * GB


def test_v2_cgroup_swap_limit(tmp_path) -> None:
    root = make_v2_root(tmp_path)
    v2_level(root, "c", limit=4 * GB, current=GB, swap_max=2 * GB, swap_current=GB // 2)
    proc = make_proc(tmp_path, cgroup="0::/c\n", swap_total=32 * GB, swap_free=32 * GB)
    reading = SystemProbe(proc_root=proc, cgroup_root=str(root)).system()
    assert (reading.swap_total_bytes, reading.swap_used_bytes, reading.swap_percent) == (
        2 * GB,
        GB // 2,
        25.0,
    )


# -- cgroup v1 ----------------------------------------------------------------------------------


HYBRID_CGROUP = "9:name=systemd:/\n4:memory:/process_api/d2b21e2b\n3:cpuset:/\n0::/\n"


def test_v1_hybrid_machine_uses_the_memory_controller_path(tmp_path) -> None:
    # the layout of the CI machine: v1 memory controller + a unified hierarchy without memory
    root = tmp_path / "cgroup"
    v1_level(root, "", usage=20 * GB)
    v1_level(root, "process_api")
    v1_level(
        root,
        "process_api/d2b21e2b",
        limit=GB,
        usage=800 * MB,
        inactive_own=10 * MB,
        inactive_total=300 * MB,
    )
    _write(root / "unified" / "cgroup.controllers", "hugetlb\n")
    reading = SystemProbe(
        proc_root=make_proc(tmp_path, cgroup=HYBRID_CGROUP), cgroup_root=str(root)
    ).system()
    assert reading.source == "cgroup v1"
    assert reading.total_bytes == GB
    assert reading.used_bytes == 500 * MB  # total_inactive_file (hierarchical) is page cache
    assert reading.available_bytes == GB - 500 * MB


def test_v1_unlimited_means_host(tmp_path) -> None:
    root = tmp_path / "cgroup"
    v1_level(root, "")
    v1_level(root, "process_api/x", usage=GB)
    reading = SystemProbe(
        proc_root=make_proc(tmp_path, cgroup="4:memory:/process_api/x\n"), cgroup_root=str(root)
    ).system()
    assert reading.source == "host"


def test_v1_ancestor_limit_applies(tmp_path) -> None:
    root = tmp_path / "cgroup"
    v1_level(root, "")
    v1_level(root, "slurm/uid_1/job_9", limit=6 * GB, usage=2 * GB, inactive_total=GB)
    v1_level(root, "slurm/uid_1/job_9/step_0", usage=GB)
    proc = make_proc(tmp_path, cgroup="4:memory:/slurm/uid_1/job_9/step_0\n")
    reading = SystemProbe(proc_root=proc, cgroup_root=str(root)).system()
    assert (reading.total_bytes, reading.available_bytes) == (6 * GB, 5 * GB)


def test_v1_container_without_cgroup_namespace(tmp_path) -> None:
    # /proc/self/cgroup shows the host path, but only the container's own cgroup is mounted
    root = tmp_path / "cgroup"
    v1_level(root, "", limit=2 * GB, usage=GB, inactive_total=GB // 4)
    proc = make_proc(tmp_path, cgroup="11:memory:/docker/0123456789abcdef\n")
    reading = SystemProbe(proc_root=proc, cgroup_root=str(root)).system()
    assert reading.source == "cgroup v1"
    assert reading.available_bytes == 2 * GB - (GB - GB // 4)


# -- process tree -------------------------------------------------------------------------------


def _fake_process(proc, pid, rss_pages, *, ppid=1, children_by_tid=None) -> None:
    _write(proc / str(pid) / "statm", f"9999 {rss_pages} 10 1 0 100 0\n")
    _write(proc / str(pid) / "stat", f"{pid} (py thon) S {ppid} 1 1 0 -1 4194304 0 0\n")
    for tid, children in (children_by_tid or {pid: []}).items():
        _write(
            proc / str(pid) / "task" / str(tid) / "children",
            " ".join(map(str, children)) + (" " if children else ""),
        )


def test_process_tree_counts_children_of_every_thread(tmp_path) -> None:
    proc = tmp_path / "proc"
    _fake_process(
        proc, 100, 1000, children_by_tid={100: [101], 105: [102]}
    )  # 105: a worker thread
    _fake_process(proc, 101, 200, ppid=100, children_by_tid={101: [103]})
    _fake_process(proc, 102, 30, ppid=100)
    _fake_process(proc, 103, 4, ppid=101)
    _fake_process(proc, 200, 77777)  # unrelated
    probe = SystemProbe(proc_root=str(proc), cgroup_root=str(tmp_path / "none"))
    assert probe.process_tree_rss(100) == (1000 + 200 + 30 + 4) * PAGE_SIZE
    assert probe.process_tree_rss(101) == (200 + 4) * PAGE_SIZE
    assert probe.process_tree_rss(999) == 0  # gone


def test_process_tree_without_children_files_scans_parents(tmp_path) -> None:
    proc = tmp_path / "proc"
    for pid, pages, ppid in ((100, 1000, 1), (101, 200, 100), (103, 4, 101), (200, 5, 1)):
        _write(proc / str(pid) / "statm", f"1 {pages} 0 0 0 0 0\n")
        _write(proc / str(pid) / "stat", f"{pid} (a) b) S {ppid} 1 1 0\n")  # ")" inside the name
        (proc / str(pid) / "task" / str(pid)).mkdir(
            parents=True
        )  # kernel without CONFIG_PROC_CHILDREN
    probe = SystemProbe(proc_root=str(proc), cgroup_root=str(tmp_path / "none"))
    assert probe.process_tree_rss(100) == (1000 + 200 + 4) * PAGE_SIZE


def test_real_process_tree_includes_a_child_process() -> None:
    before = process_tree_rss()
    code = "import sys,time; b=bytearray(120*1024*1024); b[::4096]=b'x'*len(b[::4096]); print('ready', flush=True); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        with_child = process_tree_rss()
        assert with_child - before > 100 * MB
    finally:
        child.kill()
        child.wait()
    deadline = time.monotonic() + 5
    while process_tree_rss() - before > 50 * MB and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process_tree_rss() - before < 50 * MB


def test_real_machine_reading_is_sane() -> None:
    reading = system_memory()
    assert reading.total_bytes > 0
    assert 0 < reading.available_bytes <= reading.total_bytes
    assert 0 <= reading.percent <= 100
    assert reading.source in ("host", "cgroup v1", "cgroup v2")
    assert process_tree_rss() > 10 * MB


# -- GPUs ---------------------------------------------------------------------------------------


def test_gpus_through_fake_nvml(tmp_path) -> None:
    nvml = FakeNvml([("NVIDIA A100", 40 * GB, 10 * GB), ("NVIDIA A100", 40 * GB, 30 * GB)])
    probe = SystemProbe(
        proc_root=make_proc(tmp_path), cgroup_root=str(tmp_path / "none"), nvml=nvml
    )
    gpus = probe.gpus()
    assert [(g.index, g.name, g.total_bytes, g.used_bytes) for g in gpus] == [
        (0, "NVIDIA A100", 40 * GB, 10 * GB),
        (1, "NVIDIA A100", 40 * GB, 30 * GB),
    ]
    assert gpus[1].percent == 75.0
    probe.gpus()
    assert nvml.init_calls == 1  # initialised once, not per reading
    assert nvml.memory_calls == 4


def test_no_nvml_library_means_no_gpu_and_no_exception() -> None:
    nvml = FakeNvml(fail_init=True)
    reader = GpuReader(nvml, torch_fallback=False)
    assert reader.read() == []
    assert reader.read() == []
    assert nvml.init_calls == 1  # the failure is remembered


def test_real_pynvml_without_driver_does_not_raise() -> None:
    assert isinstance(gpu_memory(), list)  # no GPU on CI: [] (and never an exception)


def test_nvml_error_mid_run_gives_empty_list() -> None:
    nvml = FakeNvml([("GPU", 8 * GB, GB)])
    reader = GpuReader(nvml, torch_fallback=False)
    assert len(reader.read()) == 1

    def broken(_handle):
        raise nvml.NVMLError("GPU is lost")

    nvml.nvmlDeviceGetMemoryInfo = broken
    assert reader.read() == []


@pytest.mark.parametrize(
    "visible, expected",
    [
        (None, [0, 1, 2]),
        ("2,0", [0, 2]),
        ("", []),
        ("-1", []),
        ("GPU-b", [1]),
        ("MIG-xyz", [0, 1, 2]),
    ],
)
def test_cuda_visible_devices_filters_nvml_devices(visible, expected) -> None:
    nvml = FakeNvml([("a", GB, 0), ("b", GB, 0), ("c", GB, 0)], uuids=["GPU-a", "GPU-b", "GPU-c"])
    environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    reader = GpuReader(nvml, torch_fallback=False, environ=environ)
    assert [g.index for g in reader.read()] == expected


def test_torch_fallback_only_when_torch_is_loaded_with_cuda(monkeypatch) -> None:
    reader = GpuReader(FakeNvml(fail_init=True), torch_fallback=True)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert reader.read() == []  # torch not imported: never imported by the probe
    assert "torch" not in sys.modules
    cuda = SimpleNamespace(
        is_initialized=lambda: True,
        current_device=lambda: 0,
        mem_get_info=lambda index: (6 * GB, 16 * GB),
        get_device_name=lambda index: "Fake GPU",
    )
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    [gpu] = reader.read()
    assert (gpu.name, gpu.total_bytes, gpu.used_bytes) == ("Fake GPU", 16 * GB, 10 * GB)
    cuda.is_initialized = lambda: False  # CUDA not initialised: do not create a context
    assert reader.read() == []
