"""VALUE: probes of what pre-trained V+L models learned (fusion degree, modality importance, cross-modal heads and
visual coreference, visual relations, linguistic knowledge), each beside a random-weights control.

    extract     every layer's attention and hidden states in the official order (:func:`attention_maps`), streamed
                to disk by :func:`write_maps`
    extract_lxmert  LXMERT's maps per stream and cross layer (:func:`lxmert_probe_forward`)
    views       one example's maps as the probes read them, for either architecture
    scoring     the probes' scoring on plain arrays (k-means NMI, [CLS] mass, cross-modal flags, linear probes)
    dataset     probe examples (grounded caption + regions) and their official padded batches
    suite       one streaming pass per model, then the five probes (:func:`run_suite`)
    load        models from run folders / checkpoint files, random-weights controls
    report      probes.json, probes.csv and the plots
    run         :func:`probe_checkpoint`, what ``fastvl probe`` runs
"""

from .dataset import ProbeExample, make_example, mask_stated_relations, official_batch
from .extract import (
    ProbeOutputs,
    attention_maps,
    encoder_of,
    eval_mode,
    hidden_states,
    probe_forward,
    read_maps,
    uniter_example_maps,
    write_maps,
)
from .extract_lxmert import LxmertProbeOutputs, lxmert_example_maps, lxmert_probe_forward
from .load import checkpoint_family, load_lxmert, load_model, load_uniter, random_control
from .run import probe_checkpoint, synthetic_examples
from .scoring import (
    box_pair_features,
    cross_modal_flags,
    fusion_nmi,
    linear_probe,
    modality_mass,
    nmi,
    phrase_region_features,
    region_pair_features,
    relation_slot_features,
)
from .suite import ProbeSettings, collect, run_suite, score
from .views import ExampleMaps, lxmert_batch, lxmert_views, uniter_views

__all__ = [
    "ExampleMaps", "LxmertProbeOutputs", "ProbeExample", "ProbeOutputs", "ProbeSettings", "attention_maps",
    "box_pair_features", "checkpoint_family", "collect", "cross_modal_flags", "encoder_of", "eval_mode",
    "fusion_nmi", "hidden_states", "linear_probe", "load_lxmert", "load_model", "load_uniter", "lxmert_batch",
    "lxmert_example_maps", "lxmert_probe_forward", "lxmert_views", "make_example", "mask_stated_relations",
    "modality_mass", "nmi", "official_batch", "phrase_region_features", "probe_checkpoint", "probe_forward",
    "random_control", "read_maps", "region_pair_features", "relation_slot_features", "run_suite", "score",
    "synthetic_examples", "uniter_example_maps", "uniter_views", "write_maps",
]
