"""Pretraining objectives of encoders, as hooks of the pretraining loop (``evolm.train.objectives``).

* ``mlm``: masked language modelling (Devlin et al., 2019, BERT): 15% of the tokens are selected;
  of those 80% become ``<mask>``, 10% a random token and 10% stay; the model predicts the originals.
  Masks are drawn anew every time a batch is prepared: RoBERTa's dynamic masking (Liu et al.,
  2019), not BERT's ten static copies.
* ``electra``: replaced-token detection (Clark et al., 2020, ELECTRA): a small generator does
  masked LM; its samples replace the masked tokens; the discriminator learns, for every token,
  whether it was replaced. Loss ``L_mlm(generator) + 50 * L_disc``.
* ``distil``: knowledge distillation of a masked LM (Sanh et al., 2019, DistilBERT; Hinton et al.,
  2015): the student matches the teacher's temperature-softened distribution at masked
  positions, predicts the masked tokens, and aligns its last hidden states with the teacher's
  (cosine). The teacher is named in the student's config (``distillation_teacher``), written by
  ``make_student``.

Inputs are the loop's packed windows of tokenizer ids, without ``[CLS]``/``[SEP]``: RoBERTa's
FULL-SENTENCES packing (contiguous text across document boundaries, documents separated by the
tokenizer's end-of-text token), with attention kept inside each document (``document_ids``).
The ``<mask>`` id is the model config's ``mask_token_id``: the encoder presets reserve id 1 and the
loop trains their tokenizer with ``<|endoftext|>`` at id 0 and ``<mask>`` at id 1
(``EncoderConfig.tokenizer_special_tokens``); a checkpoint from elsewhere names its mask id in
``config.json`` (``"mask_token_id": 103`` for BERT's uncased vocabulary).

Every objective counts masked tokens (``Prepared.count``), so accumulation weighs each masked
token the same; ``loss_sum`` returns the summed loss over them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from evolm.data.packing import Batch
from evolm.errors import ConfigError
from evolm.models.encoder import EncoderConfig, EncoderForMaskedLM, EncoderForReplacedTokenDetection
from evolm.nn.losses import IGNORE_INDEX, cross_entropy_sum
from evolm.train.objectives import Prepared


def mask_tokens(
    ids: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    mask_prob: float = 0.15,
    mask_fraction: float = 0.8,
    random_fraction: float = 0.1,
    never_mask: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption: select tokens with probability ``mask_prob``; of the selected, replace
    ``mask_fraction`` by ``<mask>``, ``random_fraction`` by a uniformly random id and leave the rest.

    Args:
        ids: (B, T) int64 token ids.
        mask_token_id: The ``<mask>`` id.
        vocab_size: Random replacements are drawn from ``[0, vocab_size)``.
        mask_prob: Selection probability of each token.
        mask_fraction: Share of selected tokens replaced by ``<mask>``.
        random_fraction: Share of selected tokens replaced by a random id.
        never_mask: Ids that are never selected (padding, separators).
        generator: Source of randomness (None: the global torch RNG).

    Returns:
        ``(inputs, labels)``, both (B, T) int64: the corrupted ids, and the original id at selected
        positions with ``IGNORE_INDEX`` elsewhere.
    """
    if not 0 < mask_prob < 1 or mask_fraction < 0 or random_fraction < 0 or mask_fraction + random_fraction > 1:
        raise ConfigError(
            f"mask_prob={mask_prob} must be in (0, 1); mask_fraction={mask_fraction} and "
            f"random_fraction={random_fraction} must be >= 0 with a sum <= 1"
        )
    select = torch.rand(ids.shape, generator=generator) < mask_prob  # (B, T)
    for i in never_mask:
        select &= ids != i
    split = torch.rand(ids.shape, generator=generator)  # (B, T): which replacement
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator)  # (B, T)
    labels = ids.masked_fill(~select, IGNORE_INDEX)
    inputs = ids.clone()
    inputs[select & (split < mask_fraction)] = mask_token_id
    rand = select & (split >= mask_fraction) & (split < mask_fraction + random_fraction)
    inputs[rand] = random_ids[rand]
    return inputs, labels


def _mask_id(cfg: EncoderConfig, mask_token_id: int | None) -> int:
    mask_id = cfg.mask_token_id if mask_token_id is None else mask_token_id
    if mask_id is None:
        raise ConfigError(
            f"the {cfg.family} model's config has no mask_token_id, which masked-LM objectives need; "
            'add it to config.json (e.g. "mask_token_id": 103 for BERT uncased) or use an encoder preset'
        )
    if not 0 <= mask_id < cfg.vocab_size:
        raise ConfigError(f"mask_token_id={mask_id} is outside the vocabulary 0..{cfg.vocab_size - 1}")
    return mask_id


def _encoder_config(model: nn.Module, kinds: tuple[type, ...], objective: str) -> EncoderConfig:
    if not isinstance(model, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ConfigError(f"objective={objective!r} trains a {names}; the model is a {type(model).__name__}")
    return model.cfg


class MaskedLMObjective:
    """Masked language modelling with BERT's 80/10/10 corruption, re-drawn at every ``prepare``.

    Args:
        model: The ``EncoderForMaskedLM`` being trained.
        mask_token_id: ``<mask>`` id (default: the model config's).
        mask_prob: Share of tokens selected (15%).
        mask_fraction: Share of the selected replaced by ``<mask>`` (80%).
        random_fraction: Share of the selected replaced by a random token (10%).
    """

    name = "mlm"

    def __init__(
        self,
        model: nn.Module,
        mask_token_id: int | None = None,
        mask_prob: float = 0.15,
        mask_fraction: float = 0.8,
        random_fraction: float = 0.1,
    ) -> None:
        cfg = _encoder_config(model, (EncoderForMaskedLM, EncoderForReplacedTokenDetection), self.name)
        self.mask_token_id = _mask_id(cfg, mask_token_id)
        self.vocab_size = cfg.vocab_size
        self.never_mask = tuple(i for i in (cfg.pad_token_id, self.mask_token_id) if i is not None)
        self.mask_prob, self.mask_fraction, self.random_fraction = mask_prob, mask_fraction, random_fraction

    def prepare(self, batch: Batch, generator: torch.Generator | None = None) -> Prepared:
        inputs, labels = mask_tokens(
            batch.input_ids,
            mask_token_id=self.mask_token_id,
            vocab_size=self.vocab_size,
            mask_prob=self.mask_prob,
            mask_fraction=self.mask_fraction,
            random_fraction=self.random_fraction,
            never_mask=self.never_mask,
            generator=generator,
        )
        return Prepared(
            inputs={"input_ids": inputs, "document_ids": batch.document_ids},
            targets={"labels": labels},
            count=int((labels != IGNORE_INDEX).sum()),
        )

    def loss_sum(
        self, model: nn.Module, prepared: Prepared, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(**{k: v.to(device) for k, v in prepared.inputs.items()})  # (B, T, V)
        loss, _ = cross_entropy_sum(logits, prepared.targets["labels"].to(device))
        return loss, {}


class ElectraObjective:
    """ELECTRA's replaced-token detection (Clark et al., 2020), generator and discriminator together.

    The model is an ``EncoderForReplacedTokenDetection`` holding its generator (the ``electra-tiny``
    preset, or any config with ``generator``); one forward runs both (see its ``forward``). Per
    masked token the loss is ``gen_ce + disc_weight * mean_bce``: the generator's cross-entropy
    summed over masked tokens plus the discriminator's binary cross-entropy, a mean over every
    token, weighted as the paper's ``lambda = 50`` and put on the masked-token count.

    Args:
        model: The discriminator with its generator.
        disc_weight: Lambda, the weight of the discriminator's loss.
        mask_prob: Share of tokens the generator fills in (15%).
        mask_fraction: Share of those shown as ``<mask>``; ELECTRA's released code uses 85% and
            leaves the rest unchanged (no random replacement).
    """

    name = "electra"

    def __init__(
        self, model: nn.Module, disc_weight: float = 50.0, mask_prob: float = 0.15, mask_fraction: float = 0.85
    ) -> None:
        cfg = _encoder_config(model, (EncoderForReplacedTokenDetection,), self.name)
        if cfg.generator is None:
            raise ConfigError(
                "objective='electra' needs a discriminator config with a generator (e.g. preset 'electra-tiny'); "
                "this ElectraForPreTraining checkpoint has none"
            )
        self.masking = MaskedLMObjective(model, mask_prob=mask_prob, mask_fraction=mask_fraction, random_fraction=0.0)
        self.disc_weight = disc_weight

    def prepare(self, batch: Batch, generator: torch.Generator | None = None) -> Prepared:
        p = self.masking.prepare(batch, generator)
        p.targets["sample_noise"] = torch.rand(batch.input_ids.shape, generator=generator)  # (B, T)
        return p

    def loss_sum(
        self, model: nn.Module, prepared: Prepared, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, float]]:
        labels = prepared.targets["labels"].to(device)
        inputs = {k: v.to(device) for k, v in prepared.inputs.items()}
        noise = prepared.targets["sample_noise"].to(device)
        disc_logits, gen_logits, corrupted = model(**inputs, mlm_labels=labels, sample_noise=noise)
        gen_sum, n_masked = cross_entropy_sum(gen_logits, labels)
        original = torch.where(labels != IGNORE_INDEX, labels, inputs["input_ids"])  # (B, T)
        replaced = (corrupted != original).float()  # (B, T)
        disc = F.binary_cross_entropy_with_logits(disc_logits.float(), replaced)  # mean over tokens
        n = max(int(n_masked), 1)
        with torch.no_grad():
            acc = ((disc_logits > 0).float() == replaced).float().mean()
        metrics = {
            "gen_loss": float(gen_sum.detach()) / n,
            "disc_loss": float(disc.detach()),
            "disc_accuracy": float(acc),
            "replaced_fraction": float(replaced.mean()),
        }
        return gen_sum + self.disc_weight * disc * prepared.count, metrics


def distillation_loss_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    *,
    temperature: float = 2.0,
    alpha_ce: float = 5.0,
    alpha_mlm: float = 2.0,
    alpha_cos: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DistilBERT's loss (Sanh et al., 2019), summed over the masked tokens.

    ``alpha_ce * T^2 * KL(softmax(t / T) || softmax(s / T))`` summed over masked positions (soft
    targets; Hinton et al., 2015), plus ``alpha_mlm`` times the masked-LM cross-entropy sum, plus
    ``alpha_cos`` times the mean ``1 - cos(h_s, h_t)`` over all tokens multiplied by the masked count,
    so that the total divided by the count is DistilBERT's per-batch loss.

    Args:
        student_logits: (B, T, V).
        teacher_logits: (B, T, V).
        labels: (B, T) original ids at masked positions, ``IGNORE_INDEX`` elsewhere.
        student_hidden: (B, T, C) last hidden states.
        teacher_hidden: (B, T, C).
        temperature: T, softening both distributions.
        alpha_ce, alpha_mlm, alpha_cos: Weights (DistilBERT's 5, 2, 1).

    Returns:
        ``(loss_sum, metrics)``: the float32 scalar and the per-masked-token parts.
    """
    masked = labels != IGNORE_INDEX  # (B, T)
    n = int(masked.sum())
    s = student_logits[masked].float() / temperature  # (M, V)
    t = teacher_logits[masked].float() / temperature  # (M, V)
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum") * temperature**2
    ce, _ = cross_entropy_sum(student_logits, labels)
    cos = 1.0 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1).mean()
    total = alpha_ce * kl + alpha_mlm * ce + alpha_cos * cos * n
    k = max(n, 1)
    return total, {"kl": float(kl.detach()) / k, "mlm_loss": float(ce.detach()) / k, "cos_loss": float(cos.detach())}


class DistillationObjective:
    """DistilBERT distillation: the student (the model trained) learns from a frozen teacher.

    Both see the same masked inputs (BERT's 80/10/10, re-drawn every batch). The teacher is
    ``teacher`` or, by default, the checkpoint named by ``distillation_teacher`` in the student's
    config (``make_student`` writes it). Teacher and student share vocabulary, mask id and width.

    Args:
        model: The student ``EncoderForMaskedLM``.
        teacher: The teacher model or its checkpoint directory (default: from the student's config).
        temperature, alpha_ce, alpha_mlm, alpha_cos: See ``distillation_loss_sum``.
    """

    name = "distil"

    def __init__(
        self,
        model: nn.Module,
        teacher: nn.Module | str | Path | None = None,
        temperature: float = 2.0,
        alpha_ce: float = 5.0,
        alpha_mlm: float = 2.0,
        alpha_cos: float = 1.0,
    ) -> None:
        from evolm.models.loading import load_model

        cfg = _encoder_config(model, (EncoderForMaskedLM,), self.name)
        if teacher is None:
            teacher = dict(cfg.extra).get("distillation_teacher")
            if teacher is None:
                raise ConfigError(
                    "objective='distil' needs a teacher: the student's config.json names none "
                    "(distillation_teacher); create the student with evolm.train.encoder_objectives.make_student"
                )
        if not isinstance(teacher, nn.Module):
            teacher = load_model(teacher, dtype=torch.float32)
        tcfg = _encoder_config(teacher, (EncoderForMaskedLM,), self.name)
        for name in ("vocab_size", "hidden_size"):
            if getattr(tcfg, name) != getattr(cfg, name):
                raise ConfigError(
                    f"teacher {name}={getattr(tcfg, name)} differs from the student's {getattr(cfg, name)}"
                )
        self.teacher = teacher.eval().requires_grad_(False)
        self.masking = MaskedLMObjective(model)
        self.kwargs = dict(temperature=temperature, alpha_ce=alpha_ce, alpha_mlm=alpha_mlm, alpha_cos=alpha_cos)

    def prepare(self, batch: Batch, generator: torch.Generator | None = None) -> Prepared:
        return self.masking.prepare(batch, generator)

    def loss_sum(
        self, model: nn.Module, prepared: Prepared, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, float]]:
        inputs = {k: v.to(device) for k, v in prepared.inputs.items()}
        labels = prepared.targets["labels"].to(device)
        self.teacher.to(device)  # a no-op after the first batch
        s_logits, s_hidden = model(**inputs, return_hidden=True)
        with torch.no_grad():
            t_logits, t_hidden = self.teacher(**inputs, return_hidden=True)
        return distillation_loss_sum(s_logits, t_logits, labels, s_hidden, t_hidden, **self.kwargs)


def make_student(teacher_dir: str | Path, out_dir: str | Path, n_layers: int | None = None) -> Path:
    """Write a DistilBERT student of a BERT masked-LM teacher, initialised as in Sanh et al. (2019).

    The student keeps the teacher's width, vocabulary and masked-LM head, and takes one layer out
    of two (teacher layers 0, 2, 4, ...). DistilBERT has no token-type embeddings, so the
    teacher's type-0 row is folded into every position embedding: on single-segment input the
    student's embeddings equal the teacher's. The student's config names the teacher
    (``distillation_teacher``), and the teacher's tokenizer files are copied beside it, so
    ``evolm train pretrain --model OUT --objective distil --tokenizer OUT`` distils it.

    Args:
        teacher_dir: Checkpoint directory of a ``bert`` masked LM.
        out_dir: Where to write the student.
        n_layers: Student depth (default: half the teacher's, rounded up).

    Returns:
        ``out_dir``.
    """
    from evolm.models.loading import load_model, save_model

    teacher_dir, out = Path(teacher_dir).resolve(), Path(out_dir)
    teacher = load_model(teacher_dir, dtype=torch.float32)
    tcfg = _encoder_config(teacher, (EncoderForMaskedLM,), "distil")
    if tcfg.family != "bert" or tcfg.norm.eps != 1e-12:
        raise ConfigError(
            f"make_student distils a bert teacher with LayerNorm eps 1e-12 into DistilBERT; got {tcfg.family} "
            f"(eps {tcfg.norm.eps})"
        )
    n = n_layers or (tcfg.n_layers + 1) // 2
    picked = [min(2 * i, tcfg.n_layers - 1) for i in range(n)]
    scfg = tcfg.replace(
        family="distilbert",
        n_layers=n,
        type_vocab_size=0,
        extra=(("distillation_teacher", str(teacher_dir)),),
    )
    student = EncoderForMaskedLM(scfg)
    t_state = teacher.state_dict()
    state = {}
    for name in student.state_dict():
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            state[name] = t_state[f"model.layers.{picked[int(i)]}.{rest}"]
        else:
            state[name] = t_state[name]
    if tcfg.type_vocab_size:
        type0 = t_state["model.embed_token_types.weight"][0]  # (E,)
        state["model.embed_positions.weight"] = state["model.embed_positions.weight"] + type0
    student.load_state_dict({k: v.clone() for k, v in state.items()})
    student.tie_weights()
    save_model(student, out)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (teacher_dir / f).is_file():
            shutil.copyfile(teacher_dir / f, out / f)
    return out
