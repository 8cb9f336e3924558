"""`benchmarks/threshold_shift.py`: the splits it fits on, and the rows it writes."""

from pathlib import Path

from conftest import benchmark_script

threshold_shift = benchmark_script("threshold_shift")


def test_a_split_leaves_a_fifth_of_the_training_images_out_the_same_way_each_time() -> None:
    train = [Path(f"{index:03d}.png") for index in range(50)]
    fitted, unseen = threshold_shift.split(train, seed=0)
    assert len(unseen) == 10 and sorted(fitted + unseen) == train
    assert fitted == sorted(fitted) and unseen == sorted(unseen)  # each in the training images' order
    assert threshold_shift.split(train, seed=0) == (fitted, unseen)
    assert threshold_shift.split(train, seed=1)[1] != unseen


def test_the_table_has_a_line_per_fit_with_both_groups_where_a_split_has_them() -> None:
    group = {"images": 20, "flagged": 0.1, "shift": 0.697, "p_value": 0.0019}
    rows = {
        "bottle": {
            "all training images": {"training images": 209, "good test images": group},
            "split 0": {
                "training images": 167,
                "good test images": group,
                "unseen training images": {"images": 42, "flagged": 0.0, "shift": 0.54, "p_value": 0.21},
            },
        }
    }
    lines = threshold_shift.table(rows).splitlines()
    assert lines[2] == "| bottle | all training images (209) | 10.0% of 20 | 0.697 (0.0019) | – | – |"
    assert lines[3] == "| bottle | split 0 (167) | 10.0% of 20 | 0.697 (0.0019) | 0.0% of 42 | 0.540 (0.21) |"
    assert all(line.count("|") == lines[0].count("|") for line in lines)
