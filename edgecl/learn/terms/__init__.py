"""Loss terms, one file each. A new method is a new file plus one line in TERMS."""
from edgecl.learn.terms.attention import Attention
from edgecl.learn.terms.base import Step, Term
from edgecl.learn.terms.der import DER
from edgecl.learn.terms.derpp import DERPP
from edgecl.learn.terms.er import ER
from edgecl.learn.terms.erg import ERG
from edgecl.learn.terms.ewc import EWC
from edgecl.learn.terms.ewcpp import EWCPP
from edgecl.learn.terms.hints import Hints
from edgecl.learn.terms.kd import KD
from edgecl.learn.terms.lwf import LwF
from edgecl.learn.terms.mas import MAS
from edgecl.learn.terms.pod import POD
from edgecl.learn.terms.rkd import RKD
from edgecl.learn.terms.rwalk import RWalk
from edgecl.learn.terms.scp import SCP
from edgecl.learn.terms.si import SI
from edgecl.learn.terms.subspace import Subspace

TERMS: dict[str, type[Term]] = {cls.name: cls for cls in (ER, DER, DERPP, EWCPP, KD)}
TERMS.update({cls.name: cls for cls in (LwF, Hints, Attention, RKD, POD, Subspace, ERG)})
TERMS.update({cls.name: cls for cls in (EWC, SI, MAS, RWalk, SCP)})

__all__ = ["Step", "Term", "TERMS"]
