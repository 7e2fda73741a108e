"""The paper's ablation ladder (MAML++ Table 1): variants of one preset, each a set of config
overrides, defined in one readable table.

`TECHNIQUES` says which `[maml_pp]` keys switch each technique of SPEC.md section 2, with their
"off" and "on" values. `LADDER` is the cumulative ladder: its first row has every technique off
(plain second-order MAML), each later row switches on the techniques it names, and the last row
is full MAML++. Reorder or regroup the rows of `LADDER` to change the ladder; nothing else needs
to change. `--leave-one-out` rows are full MAML++ minus one technique each.

Every variant sets every switch explicitly (plus `second_order = true`, so the base preset's
own switches never leak into a row). The one non-boolean switch is derivative-order annealing:
"on" keeps the base config's `first_order_epochs` (the paper's 50, quickstart's 3; a `--set`
of it chooses the value), "off" is 0: second order from the first epoch, as plain MAML.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.errors import UserError

BASE = "base"  # an "on" value taken from the base config

# technique -> {config key: (off, on)}, in SPEC.md's words:
TECHNIQUES: dict[str, dict[str, tuple[Any, Any]]] = {
    "bnrs": {"maml_pp.bn_per_step_stats": (False, True)},  # per-step BN running statistics
    "bnwb": {"maml_pp.bn_per_step_affine": (False, True)},  # per-step BN weights and biases
    "lslr": {"maml_pp.lslr": (False, True)},  # learned per-layer per-step inner rates
    "msl": {"maml_pp.msl": (False, True)},  # multi-step loss
    "da": {"maml_pp.first_order_epochs": (0, BASE)},  # derivative-order annealing
    "ca": {"maml_pp.cosine": (False, True)},  # cosine annealing of the meta learning rate
}
# Set in every variant: MAML and MAML++ are both second-order methods.
ALWAYS = {"maml_pp.second_order": True}

# The cumulative ladder: (variant name, techniques this row switches on).
LADDER: list[tuple[str, tuple[str, ...]]] = [
    ("maml", ()),
    ("+bnrs+bnwb", ("bnrs", "bnwb")),
    ("+lslr", ("lslr",)),
    ("+msl", ("msl",)),
    ("+da", ("da",)),
    ("+ca", ("ca",)),  # every technique on: full MAML++
]
FULL = "maml++"  # leave-one-out's reference row; its other rows are "-<technique>"

SWITCH_KEYS = [key for switches in TECHNIQUES.values() for key in switches]


@dataclass(frozen=True)
class Variant:
    name: str
    on: tuple[str, ...]  # techniques switched on
    note: str = ""

    def overrides(self, base: dict[str, Any] | None = None) -> dict[str, Any]:
        """`{"section.key": value}` of every switch; `base` (a resolved config dict) gives the
        values marked BASE, which stay symbolic without it."""
        out = dict(ALWAYS)
        for technique, switches in TECHNIQUES.items():
            for key, (off, on) in switches.items():
                value = on if technique in self.on else off
                if value == BASE and base is not None:
                    section, name = key.split(".")
                    value = base[section][name]
                out[key] = value
        return out


def ladder(leave_one_out: bool = False) -> list[Variant]:
    """The variants in table order: the cumulative ladder, or full MAML++ and one row per
    technique left out."""
    everything = tuple(TECHNIQUES)
    if leave_one_out:
        order = [t for _, added in LADDER for t in added]
        rows = [Variant(FULL, everything, "full MAML++")]
        rows += [Variant(f"-{t}", tuple(x for x in everything if x != t), f"MAML++ without {t}")
                 for t in order]
        return rows
    rows, on = [], ()
    for name, added in LADDER:
        on = (*on, *added)
        rows.append(Variant(name, on))
    last = rows[-1]
    if set(last.on) == set(everything):
        rows[-1] = Variant(last.name, last.on, "full MAML++")
    rows[0] = Variant(rows[0].name, rows[0].on, "every MAML++ switch off")
    return rows


def select(variants: list[Variant], names: list[str] | None, leave_one_out: bool
           ) -> list[Variant]:
    """The variants named (in table order), or all; an unknown name is a UserError."""
    if not names:
        return variants
    known = [v.name for v in variants]
    for name in names:
        if name not in known:
            which = "leave-one-out" if leave_one_out else "cumulative"
            raise UserError(f"Unknown variant {name!r} of the {which} ladder; variants: "
                            f"{', '.join(known)}.")
    return [v for v in variants if v.name in names]


def check_base(base: dict[str, Any], overrides: list[str]) -> None:
    """Refuse `--set`s the ladder decides, and a base whose "on" values cannot switch on."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in SWITCH_KEYS and TECHNIQUES[_technique(key)][key][1] != BASE or key in ALWAYS:
            raise UserError(f"--set {key} is a switch the ablation ladder sets in every variant; "
                            "leave it out (`mamlpp ablate --list` shows the variants).")
    foe = base["maml_pp"]["first_order_epochs"]
    if foe < 1:
        raise UserError(f"Derivative-order annealing needs maml_pp.first_order_epochs >= 1 in the "
                        f"base config to switch on (got {foe}); give one with --set "
                        "maml_pp.first_order_epochs=N.")
    if base["maml_pp"]["msl_epochs"] < 1:
        raise UserError("The multi-step loss needs maml_pp.msl_epochs >= 1 in the base config to "
                        "switch on; give one with --set maml_pp.msl_epochs=N.")


def _technique(key: str) -> str:
    return next(t for t, switches in TECHNIQUES.items() if key in switches)
