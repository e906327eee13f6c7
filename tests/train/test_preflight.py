"""The checks `zeroconv train` runs before loading a model, where a launch runs them in every process at once."""

from concurrent.futures import ThreadPoolExecutor

from zeroconv.train.preflight import check_output_dir


def test_processes_probing_one_output_dir_at_once_all_find_it_writable(tmp_path):
    """Each process of `accelerate launch` checks --output_dir at the same moment; a probe file with one shared name
    was removed by one while another still wrote it, and that process refused a writable folder (CI, 2 processes)."""
    out = tmp_path / "out"

    def probe_many(_):
        for _ in range(300):
            check_output_dir(str(out))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(probe_many, range(4)))    # re-raises the first UserError of any thread
    assert out.is_dir() and list(out.iterdir()) == []
