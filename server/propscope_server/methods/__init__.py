"""The registry of explanation methods: the one list ListModels, the runner and the
API consult. Adding a method = an ExplanationMethod plus one entry here."""

from __future__ import annotations

from propscope_server.errors import FailedPrecondition
from propscope_server.inference import ModelDescription
from propscope_server.methods.base import Capability, MethodInfo, model_capabilities

# Every method the gateway serves, by name. Metrics are listed with the methods they
# score: they need what the methods need.
METHODS: tuple[MethodInfo, ...] = (
    MethodInfo(
        "propgrad",
        "Explain",
        Capability.FORWARD | Capability.EDITORS,
        "gradual semantic interventions, E|dp| with a permutation test (arXiv 2503.05424)",
    ),
    MethodInfo(
        "interactions",
        "Interactions",
        Capability.FORWARD | Capability.EDITORS,
        "Sobol indices of composed semantic edits' strengths: first and total order, a pair's "
        "second order, the interaction share",
    ),
    MethodInfo("sobol", "Attribute", Capability.FORWARD, "total-order Sobol indices of regions"),
    MethodInfo("rise", "Attribute", Capability.FORWARD, "RISE: random masks, weighted mean"),
    MethodInfo(
        "eva",
        "Attribute",
        Capability.FORWARD | Capability.BOUNDS,
        "EVA: how much holding a region fixed lowers the verified adversarial-overlap bound "
        "(CVPR 2023)",
    ),
    MethodInfo("deletion", "EvaluateAttribution", Capability.FORWARD, "Deletion AUC"),
    MethodInfo("insertion", "EvaluateAttribution", Capability.FORWARD, "Insertion AUC"),
    MethodInfo("mu_fidelity", "EvaluateAttribution", Capability.FORWARD, "MuFidelity"),
    MethodInfo("stability", "EvaluateAttribution", Capability.FORWARD, "average stability"),
    MethodInfo(
        "consistency",
        "EvaluateConsistency",
        Capability.FORWARD,
        "MeGe and ReCo of Sobol, RISE and random maps across models (WACV 2022)",
    ),
    MethodInfo(
        "saliency",
        "EvaluateConsistency",
        Capability.FORWARD | Capability.GRADIENTS,
        "saliency map |d logit / d pixel|, scored by MeGe and ReCo",
    ),
    MethodInfo(
        "gradient_x_input",
        "EvaluateConsistency",
        Capability.FORWARD | Capability.GRADIENTS,
        "gradient x input map, scored by MeGe and ReCo",
    ),
    MethodInfo(
        "causal_graph",
        "BuildGraph",
        Capability.FORWARD | Capability.ACTIVATIONS | Capability.INTERVENTIONS,
        "causal explanatory graph of hidden channels by gradual do-interventions "
        "(arXiv 2305.08950)",
    ),
    MethodInfo(
        "craft",
        "FitConcepts",
        Capability.FORWARD | Capability.ACTIVATIONS | Capability.INTERVENTIONS,
        "CRAFT concepts: NMF of a layer's activations, Sobol importance (CVPR 2023)",
    ),
    MethodInfo(
        "maco",
        "Visualize",
        Capability.FORWARD | Capability.GRADIENTS,
        "MACO feature visualisation: a picture maximising a class, channel or concept, "
        "phase-only Fourier optimisation (NeurIPS 2023)",
    ),
)
BY_NAME = {method.name: method for method in METHODS}


def supported(model: ModelDescription) -> tuple[str, ...]:
    """The methods this model supports (none for an editor). EDITORS is never missing:
    PropGrad also takes caller-provided paths, which need only forward passes."""
    offered = model_capabilities(model)
    if not offered:
        return ()
    offered |= Capability.EDITORS
    return tuple(m.name for m in METHODS if (m.needs & offered) == m.needs)


def require(method: str, model: ModelDescription) -> None:
    """FailedPrecondition naming the missing capability when `model` lacks one that
    `method` needs."""
    missing = BY_NAME[method].needs & ~(model_capabilities(model) | Capability.EDITORS)
    if missing:
        names = ", ".join(c.name.lower() for c in Capability if c in missing)
        raise FailedPrecondition(
            f"method {method!r} needs {names} from model {model.name!r}, which does not "
            "declare them; deploy a variant that exposes them (propscope.capabilities in "
            "its config.pbtxt) or choose a black-box method",
            field="method",
        )
