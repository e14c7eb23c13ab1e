"""Loss terms, one file each. A new method is a new file plus one line in TERMS."""
from edgecl.learn.terms.base import Step, Term
from edgecl.learn.terms.der import DER
from edgecl.learn.terms.derpp import DERPP
from edgecl.learn.terms.er import ER
from edgecl.learn.terms.ewcpp import EWCPP
from edgecl.learn.terms.kd import KD

TERMS: dict[str, type[Term]] = {cls.name: cls for cls in (ER, DER, DERPP, EWCPP, KD)}

__all__ = ["Step", "Term", "TERMS"]
