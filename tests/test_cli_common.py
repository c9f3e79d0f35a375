"""The --json contract: one line of strict JSON on stdout, whatever the numbers."""

from __future__ import annotations

import json

import numpy as np

from ilora.cli.common import print_json


def strict_loads(text: str):
    """json.loads that refuses NaN / Infinity, as JavaScript's JSON.parse and Go do."""

    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_print_as_null_and_numpy_values_as_json(capsys):
    print_json({
        "hr@1": float("nan"),
        "ratio": np.float32("inf"),
        "nested": {"values": [1.5, -float("inf"), np.float64(2.0)], "array": np.array([[1, 2], [3, 4]])},
        "count": np.int64(3),
        "tuple": (np.nan, 1),
        "path": object.__new__(type("Path", (), {"__str__": lambda self: "/x"})),
    })
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.endswith("\n")
    assert strict_loads(out) == {
        "hr@1": None,
        "ratio": None,
        "nested": {"values": [1.5, None, 2.0], "array": [[1, 2], [3, 4]]},
        "count": 3,
        "tuple": [None, 1],
        "path": "/x",
    }
