"""VALUE: probes of what pre-trained V+L models learned (fusion degree, modality importance, cross-modal heads and
visual coreference, visual relations, linguistic knowledge), each beside a random-weights control.

    extract     every layer's attention and hidden states in the official order (:func:`attention_maps`)
"""

from .extract import (
    ProbeOutputs,
    attention_maps,
    encoder_of,
    eval_mode,
    hidden_states,
    probe_forward,
    read_maps,
    write_maps,
)

__all__ = ["ProbeOutputs", "attention_maps", "encoder_of", "eval_mode", "hidden_states", "probe_forward",
           "read_maps", "write_maps"]
