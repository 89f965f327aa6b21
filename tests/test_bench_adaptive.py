"""bench_adaptive's `--only`: which panels a selector names, and a clear refusal of one the grid lacks."""
import math

import pytest

from bench.bench_adaptive import panels, selected, selectors


def test_only_names_the_panels_of_its_selectors_and_every_panel_without_one():
    grid = panels(10)
    only = selectors("gh200-96g/opt-13b/offline/0.5,h100-sxm-pcie5/*/knee/0.9")
    picked = {(b.hw, b.model, load, b.gpu_mem_util) for b in grid for load in ("offline", "knee")
              if selected(b, load, only)}
    assert picked == {("gh200-96g", "opt-13b", "offline", 0.5), ("h100-sxm-pcie5", "opt-13b", "knee", 0.9),
                      ("h100-sxm-pcie5", "opt-30b", "knee", 0.9)}
    assert all(selected(b, "knee", []) for b in grid) and all(b.rate == math.inf for b in grid)


@pytest.mark.parametrize("text", ["gh200-96g/opt-13b/offline", "a100/opt-13b/offline/0.5",
                                  "gh200-96g/opt-13b/serving/0.5", "gh200-96g/opt-13b/offline/0.7"])
def test_a_selector_the_grid_lacks_is_refused_naming_the_option(text):
    with pytest.raises(ValueError, match=f"--only: '{text}' is not HW/MODEL/LOAD/UTIL"):
        selectors(text)
