"""VALUE: probes of what pre-trained V+L models learned (fusion degree, modality importance, cross-modal heads and
visual coreference, visual relations, linguistic knowledge), each beside a random-weights control."""
