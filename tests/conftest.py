"""Shared fixtures: tiny seeded random models (never a download), one thread per process."""

from __future__ import annotations

import pytest
import torch

from ssd_core.models import wrap_model
from tiny_models import perturbed_copy, random_model, tiny_llama_config

torch.set_num_threads(1)


def make_pair(vocab: int = 64, draft_kind: str = "perturbed", seed: int = 0, init_std: float = 0.3):
    """(target, draft) LoadedModels. draft_kind: 'same' (100% acceptance), 'perturbed' (high but
    imperfect agreement), 'independent' (a different random model: mostly rejections)."""
    target = random_model(tiny_llama_config(vocab_size=vocab), seed, init_std=init_std)
    if draft_kind == "same":
        draft = target
    elif draft_kind == "perturbed":
        draft = perturbed_copy(target, 0.08, seed + 1)
    elif draft_kind == "independent":
        draft = random_model(tiny_llama_config(vocab_size=vocab, layers=1, hidden_size=16, heads=2, kv_heads=1),
                             seed + 100, init_std=init_std)
    else:
        raise ValueError(draft_kind)
    return wrap_model(target, None, "target"), wrap_model(draft, None, "draft")


def hf_greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Reference: HF generate(do_sample=False) on the target alone."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                         min_new_tokens=max_new_tokens, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="session")
def perturbed_pair():
    return make_pair(draft_kind="perturbed")


def char_tokenizer(vocab_size: int = 64):
    """A tiny character-level fast tokenizer (ids < vocab_size) for text paths in tests."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    chars = list(" \n\tabcdefghijklmnopqrstuvwxyz():,.=_0123456789\"'[]+-*/<>#ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    vocab = {"<unk>": 0}
    for ch in chars[: vocab_size - 1]:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def save_tiny_pair(root, vocab: int = 64, draft_kind: str = "perturbed"):
    """Save a tiny (target, draft) pair with a shared char tokenizer as HF dirs; returns paths."""
    target, draft = make_pair(vocab=vocab, draft_kind=draft_kind)
    tok = char_tokenizer(vocab)
    for name, m in (("target", target), ("draft", draft)):
        m.model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root / "target", root / "draft"


def write_pki(root, leaves=("target", "draft", "client"), name_only=("target_by_name",)):
    """A test CA, leaf certificates (CN "ssd <stem>", serverAuth + clientAuth, SAN localhost /
    127.0.0.1) for `leaves`, SAN localhost only for `name_only`, and a rogue CA with a client of its
    own; PEM files under `root`."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def save(stem, key, cert):
        (root / f"{stem}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
        (root / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def ca(cn):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn)).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        return key, cert

    def leaf(cn, ca_key, ca_cert, with_ip=True):
        key = ec.generate_private_key(ec.SECP256R1())
        ips = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))] if with_ip else []
        san = x509.SubjectAlternativeName([x509.DNSName("localhost"), *ips])
        eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(san, critical=False).add_extension(eku, critical=False)
                .sign(ca_key, hashes.SHA256()))
        return key, cert

    ca_key, ca_cert = ca("ssd test CA")
    save("ca", ca_key, ca_cert)
    for stem in leaves:
        save(stem, *leaf(f"ssd {stem}", ca_key, ca_cert))
    for stem in name_only:
        save(stem, *leaf(f"ssd {stem}", ca_key, ca_cert, with_ip=False))
    save("rogue_ca", *ca("someone else's CA"))
    rogue_key, rogue_cert = ca("someone else's CA")
    save("rogue_client", *leaf("rogue", rogue_key, rogue_cert))
    return root
