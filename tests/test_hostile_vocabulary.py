"""Vocabularies as careless or hostile users pass them (issue 11, item 5).

Every case states its outcome next to it: the error type and the text that names the offending entry, or the exact
vocabulary / prompts / tokens expected, computed independently (literal values, or the CLIP tokenizer run directly on
prompts built by plain string concatenation).
"""

from __future__ import annotations

import unicodedata
import warnings

import numpy as np
import pytest
import torch

from transformers_possam import (
    VILD_TEMPLATES,
    PosSAMImageProcessor,
    PosSAMProcessor,
    clip_tokenizer_from_bpe,
    load_vocabulary,
)
from transformers_possam.processing_possam import resolve_vocabulary, seen_class_mask
from transformers_possam.vocabularies import Vocabulary


# Enough repeated words to push every ViLD prompt past CLIP's 77-token context.
LONG_PREFIX = "very " * 80


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer_from_bpe()


@pytest.fixture(scope="module")
def processor(tokenizer):
    return PosSAMProcessor(PosSAMImageProcessor(), tokenizer)


def concatenated_prompts(label: str) -> list[str]:
    """The 14 ViLD prompts of `label`, built by splitting each template at its one `{}` (no str.format involved)."""
    prompts = []
    for template in VILD_TEMPLATES:
        prefix, suffix = template.split("{}")
        prompts.append(prefix + label + suffix)
    return prompts


def reference_tokens(tokenizer, vocabulary_synonyms: list[list[str]]) -> dict[str, torch.Tensor]:
    """Tokenize every (class, slot, template) prompt in one tokenizer call, padding slots repeating synonym 0."""
    slots = max(len(names) for names in vocabulary_synonyms)
    prompts = [
        prompt
        for names in vocabulary_synonyms
        for name in names + [names[0]] * (slots - len(names))
        for prompt in concatenated_prompts(name)
    ]
    tokens = tokenizer(prompts, padding="longest", truncation=True, max_length=77, return_tensors="pt")
    shape = (len(vocabulary_synonyms), slots, len(VILD_TEMPLATES), -1)
    return {key: tokens[key].view(shape) for key in ("input_ids", "attention_mask")}


# --- whole-vocabulary forms that are errors -------------------------------------------------------------------------

BAD_VOCABULARIES = [
    pytest.param(None, TypeError, r"candidate_labels is None", id="None->TypeError"),
    pytest.param(
        {"name": "cat", "isthing": True},
        TypeError,
        r"single dict \{'name': 'cat'",
        id="bare_dict->TypeError_wrap_in_list",
    ),
    pytest.param({"cat", "dog"}, TypeError, r"set, which has no order", id="set->TypeError_unordered"),
    pytest.param(frozenset({"cat"}), TypeError, r"frozenset, which has no order", id="frozenset->TypeError_unordered"),
    pytest.param(b"cat,dog", TypeError, r"candidate_labels is bytes", id="bytes->TypeError"),
    pytest.param(5, TypeError, r"candidate_labels = 5 has type int", id="int->TypeError"),
    pytest.param(np.array([["cat", "dog"]]), TypeError, r"2-D array of shape \(1, 2\)", id="2D_numpy->TypeError"),
    pytest.param(
        "coco133", ValueError, r"'coco133' is not a preset", id="preset_typo_coco133->ValueError"
    ),  # already fine
    pytest.param("ade20", ValueError, r"'ade20' is not a preset", id="preset_typo_ade20->ValueError"),  # already fine
    # issue 13: a plain string lists classes (transformers' zero-shot convention), so "cat" is now the one class
    # ["cat"] (test_strings_list_classes below); "coco133" / "ade20" stay errors as misspelt presets, with both fixes
    pytest.param(
        "ade_20k", ValueError, r"'ade_20k' is not a preset .*looks like one.*\['ade_20k'\]", id="preset_typo_ade_20k"
    ),
    pytest.param("cat,,dog", ValueError, r"'cat,,dog' has an empty class \(part 1", id="string_empty_class"),
    pytest.param("cat,dog,", ValueError, r"empty class \(part 2", id="string_trailing_comma"),
    pytest.param(" , ", ValueError, r"names no class", id="string_only_commas"),
    pytest.param([], ValueError, r"empty", id="empty_list->ValueError"),  # already fine
    pytest.param(iter([]), ValueError, r"empty", id="exhausted_iterator->ValueError"),  # already fine
]


@pytest.mark.parametrize("candidate_labels, error, message", BAD_VOCABULARIES)
def test_bad_vocabulary_forms(candidate_labels, error, message):
    with pytest.raises(error, match=message):
        resolve_vocabulary(candidate_labels)


# --- single labels that are errors: the message names candidate_labels[index] and the value -------------------------

BAD_LABELS = [
    pytest.param(
        [{"name": None}],
        TypeError,
        r"candidate_labels\[0\]\['name'\] = None has type NoneType",
        id="name_None->TypeError",
    ),
    pytest.param(
        ["cat", {"name": 5}], TypeError, r"candidate_labels\[1\]\['name'\] = 5 has type int", id="name_int->TypeError"
    ),
    pytest.param(
        [{"name": ["cat", "kitty"]}],
        TypeError,
        r"\['name'\] = \['cat', 'kitty'\].*'synonyms'",  # issue 13: the hint names the dict's 'synonyms' key
        id="name_list->TypeError_use_synonyms_key",
    ),
    # already fine (index and value named, only the wording changed): the four below
    pytest.param(["cat", {"name": ""}], ValueError, r"1.*''.* is blank", id="name_empty->ValueError_blank"),
    pytest.param([{"name": "  "}], ValueError, r"0.*'  '.* is blank", id="name_spaces->ValueError_blank"),
    pytest.param([{"name": ",,"}], ValueError, r"0.*',,'.* is blank", id="name_commas->ValueError_blank"),
    pytest.param([{}], ValueError, r"0.* is a dict without 'name'", id="dict_without_name->ValueError"),
    pytest.param(
        [{"name": "cat", "is_thing": False}],
        ValueError,
        r"candidate_labels\[0\].*unknown key\(s\) \['is_thing'\].*\['name', 'synonyms', 'isthing'\]",
        id="key_is_thing->ValueError",
    ),
    pytest.param(
        [{"name": "cat", "isThing": False}],
        ValueError,
        r"unknown key\(s\) \['isThing'\]",
        id="key_isThing->ValueError",
    ),
    pytest.param(
        [{"name": "cat", "thing": True}], ValueError, r"unknown key\(s\) \['thing'\]", id="key_thing->ValueError"
    ),
    pytest.param(
        [{"label": "cat"}],
        ValueError,
        r"candidate_labels\[0\].*unknown key\(s\) \['label'\]",
        id="key_label->ValueError",
    ),
    pytest.param(
        [{"id": 1, "name": "person", "is_thing": 1}],
        ValueError,
        r"unknown key\(s\) \['is_thing'\]",
        id="coco_category_with_misspelled_flag->ValueError",
    ),
    pytest.param(
        [{"name": "sky", "isthing": "false"}],
        TypeError,
        r"candidate_labels\[0\]\['isthing'\] = 'false' has type str",
        id="isthing_str_false->TypeError",
    ),
    pytest.param(
        [{"name": "sky", "isthing": "true"}],
        TypeError,
        r"\['isthing'\] = 'true' has type str",
        id="isthing_str_true->TypeError",
    ),
    pytest.param(
        [{"name": "sky", "isthing": None}],
        TypeError,
        r"\['isthing'\] = None has type NoneType",
        id="isthing_None->TypeError",
    ),
    pytest.param(
        [{"name": "sky", "isthing": 1.0}],
        TypeError,
        r"\['isthing'\] = 1.0 has type float",
        id="isthing_float->TypeError",
    ),
    pytest.param(
        [{"name": "sky", "isthing": 2}], ValueError, r"\['isthing'\] = 2: .*only 1 and 0", id="isthing_2->ValueError"
    ),
    # entries of a wrong type: TypeError (they raised ValueError before, or AttributeError inside a dict)
    pytest.param(
        ["cat", None], TypeError, r"candidate_labels\[1\] = None has type NoneType", id="entry_None->TypeError"
    ),
    pytest.param(["cat", 3], TypeError, r"candidate_labels\[1\] = 3 has type int", id="entry_int->TypeError"),
    pytest.param([1.5], TypeError, r"candidate_labels\[0\] = 1.5 has type float", id="entry_float->TypeError"),
    pytest.param(
        [b"cat"],
        TypeError,
        r"candidate_labels\[0\] = b'cat' has type bytes.*Decode",
        id="entry_bytes->TypeError_decode",
    ),
    # issue 13: a list is now one class's synonyms (ACCEPTED below); errors inside it name the synonym
    pytest.param(
        [["cat", ["kitty"]]],
        TypeError,
        r"candidate_labels\[0\]\[1\] = \['kitty'\] has type list; a synonym is a str",
        id="list_nested_twice->TypeError",
    ),
    pytest.param(
        [["cat,kitty", "dog"]],
        ValueError,
        r"candidate_labels\[0\]\[0\] = 'cat,kitty' holds a comma.*\['cat', 'kitty'\]",
        id="comma_inside_synonym_list->ValueError",
    ),
    pytest.param([[]], ValueError, r"candidate_labels\[0\] is an empty list of synonyms", id="empty_synonym_list"),
    pytest.param([["cat", " "]], ValueError, r"candidate_labels\[0\]\[1\] = ' ' is blank", id="blank_synonym"),
    pytest.param(
        [{"name": "cat", "synonyms": "kitty"}],
        TypeError,
        r"\['synonyms'\] = 'kitty' has type str; synonyms are a list of str",
        id="synonyms_str->TypeError",
    ),
    pytest.param(
        [{"name": "cat", "synonyms": ["kitty", None]}],
        TypeError,
        r"\['synonyms'\]\[1\] = None has type NoneType",
        id="synonyms_None_entry->TypeError",
    ),
    pytest.param(
        np.array(["cat", None], dtype=object),
        TypeError,
        r"candidate_labels\[1\] = None",
        id="numpy_object_None->TypeError",
    ),
    pytest.param(
        ["cat,,dog"],
        ValueError,
        r"candidate_labels\[0\] = 'cat,,dog' has an empty synonym \(part 1",
        id="double_comma->ValueError",
    ),
    pytest.param(
        ["cat, "],
        ValueError,
        r"candidate_labels\[0\] = 'cat, ' has an empty synonym \(part 1",
        id="trailing_comma->ValueError",
    ),
    pytest.param([",cat"], ValueError, r"',cat' has an empty synonym \(part 0", id="leading_comma->ValueError"),
    pytest.param(
        ["dog", "cat\ndog"],
        ValueError,
        r"candidate_labels\[1\] = 'cat\\ndog' holds the control character '\\n'",
        id="inner_newline->ValueError",
    ),
    pytest.param(["cat\tdog"], ValueError, r"control character '\\t'", id="inner_tab->ValueError"),
    pytest.param(["cat\x00"], ValueError, r"control character '\\x00'", id="nul_char->ValueError"),
    pytest.param(
        ["cat\u2028dog"], ValueError, r"control character '\\u2028'", id="unicode_line_separator->ValueError"
    ),
]


@pytest.mark.parametrize("candidate_labels, error, message", BAD_LABELS)
def test_bad_labels(candidate_labels, error, message):
    with pytest.raises(error, match=message):
        resolve_vocabulary(candidate_labels)


# --- labels CLIP cannot tell apart ----------------------------------------------------------------------------------

INDISTINCT = [
    pytest.param(["cat", "cat"], r"Duplicate label.*'cat'", id="same_label->ValueError"),  # already rejected before
    pytest.param(
        ["Cat", " cat "], r"Duplicate label.*cat", id="case_and_spaces->ValueError"
    ),  # already rejected before
    pytest.param(
        ["ice cream", "ice  cream"],
        r"Duplicate label: label 1 \('ice  cream'\) repeats label 0",
        id="inner_spacing->ValueError",
    ),
    pytest.param(
        [unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")],
        r"Duplicate label: label 1 .* repeats label 0",
        id="NFC_vs_NFD->ValueError",
    ),
    pytest.param(
        ["cat,kitty", "kitty, cat"],
        r"Duplicate label: label 1 \('kitty,cat'\) repeats label 0 \('cat,kitty'\)",
        id="same_synonyms_reordered->ValueError",
    ),
]


@pytest.mark.parametrize("candidate_labels, message", INDISTINCT)
def test_indistinguishable_labels(candidate_labels, message):
    with pytest.raises(ValueError, match=message):
        resolve_vocabulary(candidate_labels)


@pytest.mark.parametrize(
    "candidate_labels,message,expected_names",
    [
        # a synonym shared by two classes: warned (FC-CLIP's large vocabularies have such), the vocabulary kept as given
        (
            ["cat", "dog", "cat,kitty"],
            r"Duplicate synonym 'cat' in label 0 \('cat'\) and label 2 \('cat,kitty'\)",
            ("cat", "dog", "cat,kitty"),
        ),
        (
            ["dog,puppy", "wolf,Puppy"],
            r"Duplicate synonym 'Puppy' in label 0 \('dog,puppy'\) and label 1",
            ("dog,puppy", "wolf,Puppy"),
        ),
    ],
    ids=["shared_synonym->UserWarning", "shared_synonym_case->UserWarning"],
)
def test_shared_synonyms_warn(candidate_labels, message, expected_names):
    with pytest.warns(UserWarning, match=message):
        vocabulary = resolve_vocabulary(candidate_labels)
    assert vocabulary.names == expected_names


def test_coco_category_dicts_are_accepted_as_they_are():
    """COCO's category dicts (id, name, isthing 0/1, color, supercategory): id / color / supercategory ignored."""
    categories = [
        {"supercategory": "person", "color": [220, 20, 60], "isthing": 1, "id": 1, "name": "person"},
        {"supercategory": "sky", "color": [70, 130, 180], "isthing": 0, "id": 187, "name": "sky-other-merged"},
    ]
    vocabulary = resolve_vocabulary(categories)
    assert vocabulary.names == ("person", "sky-other-merged") and vocabulary.is_thing == (True, False)


# --- accepted forms: the resolved vocabulary, written out -----------------------------------------------------------

ACCEPTED = [
    pytest.param(("cat", "dog"), ("cat", "dog"), (True, True), id="tuple->two_things"),
    # issue 13: a list per class holds its synonyms (was a TypeError); a dict may add "synonyms" to its name
    pytest.param([["cat", " kitty "], "dog"], ("cat,kitty", "dog"), (True, True), id="synonym_list->one_class"),
    pytest.param([("cat", "kitty")], ("cat,kitty",), (True,), id="synonym_tuple->one_class"),
    pytest.param(
        [{"name": "sky", "synonyms": ["clouds"], "isthing": False}, "dog"],
        ("sky,clouds", "dog"),
        (False, True),
        id="dict_synonyms->one_class",
    ),
    pytest.param(
        [{"name": "sky,clouds", "isthing": False}], ("sky,clouds",), (False,), id="dict_name_with_commas->synonyms"
    ),
    # issue 13: a string lists classes, as transformers' zero-shot pipelines split candidate_labels
    pytest.param("cat", ("cat",), (True,), id="string_one_class"),
    pytest.param(" cat , dog ", ("cat", "dog"), (True, True), id="string->classes_stripped"),
    pytest.param((name for name in ["cat", "dog"]), ("cat", "dog"), (True, True), id="generator->read_once"),
    pytest.param(np.array(["cat", "sky"]), ("cat", "sky"), (True, True), id="numpy_str_array"),
    pytest.param([" cat ", "dog\n"], ("cat", "dog"), (True, True), id="surrounding_whitespace->stripped"),
    pytest.param([["cat", "cat"]], ("cat,cat",), (True,), id="repeat_inside_one_class->kept"),
    pytest.param(
        [
            {"name": "person", "isthing": 1},
            {"name": "sky", "isthing": 0},
            {"name": "road", "isthing": np.False_},
            {"name": "car"},
        ],
        ("person", "sky", "road", "car"),
        (True, False, False, True),
        id="isthing_1_0_numpy_missing",
    ),
    pytest.param(
        [["🐈", "🐱"], "قطة", "猫", "כלב"],
        ("🐈,🐱", "قطة", "猫", "כלב"),
        (True, True, True, True),
        id="emoji_RTL_CJK->kept",
    ),
    pytest.param(["{}", "{0}", "{x!r}", "}{"], ("{}", "{0}", "{x!r}", "}{"), (True,) * 4, id="braces->kept"),
]


@pytest.mark.parametrize("candidate_labels, names, is_thing", ACCEPTED)
def test_accepted_forms(candidate_labels, names, is_thing):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the explicit forms are read without a warning
        vocabulary = resolve_vocabulary(candidate_labels)
    assert vocabulary.names == names and vocabulary.is_thing == is_thing
    assert all(type(name) is str for name in vocabulary.names)  # no numpy scalars leak into names


# issue 13: a str label holding commas keeps FC-CLIP's meaning (synonyms of one class) but is no longer silent: a
# UserWarning spells out the synonym forms and the two ways of writing separate classes
COMMA_LABELS = [
    pytest.param(
        np.array(["cat", "sky,clouds"]), ("cat", "sky,clouds"), "candidate_labels\\[1\\] = 'sky,clouds'", id="numpy"
    ),
    pytest.param(
        [" cat , kitty ", "dog\n"], ("cat,kitty", "dog"), "candidate_labels\\[0\\] = 'cat,kitty'", id="stripped"
    ),
    pytest.param(["cat,cat"], ("cat,cat",), "candidate_labels\\[0\\] = 'cat,cat'", id="repeat_inside_one_class"),
    pytest.param(["🐈,🐱", "猫"], ("🐈,🐱", "猫"), "candidate_labels\\[0\\] = '🐈,🐱'", id="emoji"),
]


@pytest.mark.parametrize("candidate_labels, names, where", COMMA_LABELS)
def test_comma_inside_a_str_label_warns_with_every_writing(candidate_labels, names, where):
    with pytest.warns(
        UserWarning, match=where + r" holds commas and is read as ONE class with the synonyms"
    ) as caught:
        vocabulary = resolve_vocabulary(candidate_labels)
    assert vocabulary.names == names
    message = str(caught[0].message)
    synonyms = names[0].split(",") if "," in names[0] else names[1].split(",")
    assert repr(synonyms) in message and "'synonyms'" in message  # the two explicit synonym forms
    assert repr(",".join(synonyms)) in message  # the string form, for separate classes


def test_preset_typo_names_the_closest_presets():
    # issue 13: a string is a class list unless it is a preset; one that looks like a misspelt preset is an error
    # giving both writings (the preset, or a one-class list)
    with pytest.raises(ValueError, match=r"'ade_20k' is not a preset .*write 'ade20k'.*pass a list: \['ade_20k'\]"):
        resolve_vocabulary("ade_20k")
    # plain words close to a short alias are classes, not typos
    assert resolve_vocabulary("made").names == ("made",) and resolve_vocabulary("cocoa").names == ("cocoa",)


def test_presets_ignore_case_and_spaces():  # already fine: documented preset rule
    assert resolve_vocabulary(" ADE20K ") is load_vocabulary("ade20k_150")
    assert resolve_vocabulary("Coco") is load_vocabulary("coco_panoptic_133")


# --- the is_thing argument and Vocabulary objects -------------------------------------------------------------------


def test_is_thing_argument():
    assert resolve_vocabulary(["cat", "sky"], is_thing=[True, False]).is_thing == (True, False)  # already fine
    with pytest.raises(TypeError, match=r"is_thing\[0\] = 'false' has type str"):
        resolve_vocabulary(["cat", "sky"], is_thing=["false", False])
    with pytest.raises(TypeError, match=r"is_thing must be a list of bools.*bool"):
        resolve_vocabulary(["cat"], is_thing=False)
    with pytest.raises(ValueError, match=r"is_thing cannot be combined with the preset 'coco'"):
        resolve_vocabulary("coco", is_thing=[True] * 133)
    # issue 13: a string of classes takes is_thing like a list
    assert resolve_vocabulary("cat, sky", is_thing=[True, False]).is_thing == (True, False)
    with pytest.raises(
        ValueError, match=r"candidate_labels\[1\] = \{'name': 'sky', 'isthing': False\} has its own 'isthing'"
    ):
        resolve_vocabulary(["cat", {"name": "sky", "isthing": False}], is_thing=[True, True])


def test_vocabulary_checks_its_fields():
    assert Vocabulary(names=[" cat , kitty "], is_thing=[np.True_]) == Vocabulary(
        names=("cat,kitty",), is_thing=(True,)
    )
    with pytest.raises(TypeError, match=r"Vocabulary.names must be a tuple or list, got a str: 'cat'"):
        Vocabulary(names="cat", is_thing=(True,))
    with pytest.raises(TypeError, match=r"is_thing\[0\] = 'false' has type str"):
        Vocabulary(names=("sky",), is_thing=("false",))
    with pytest.raises(ValueError, match=r"Vocabulary has no class"):
        Vocabulary(names=(), is_thing=())
    with pytest.raises(ValueError, match=r"2 names but 1 is_thing flags"):
        Vocabulary(names=("cat", "dog"), is_thing=(True,))
    with pytest.raises(ValueError, match=r"label 1 = 'cat,,dog' has an empty synonym"):
        Vocabulary(names=("sky", "cat,,dog"), is_thing=(False, True))


# --- prompts and tokens (encode_vocabulary) -------------------------------------------------------------------------


def test_braces_never_reach_format_fields(processor, tokenizer):
    """Prompts equal the templates filled by plain concatenation, tokens equal the tokenizer run on those."""
    labels = ["{}", "{0}", "{x!r}", "}{", "a {{b}} c"]
    from transformers_possam.processing_possam import (
        fill_templates,  # new helper; the token check below ran before too
    )

    for label in labels:
        assert fill_templates(label) == concatenated_prompts(label)
    tokens = processor.encode_vocabulary(labels)
    reference = reference_tokens(tokenizer, [[label] for label in labels])
    assert torch.equal(tokens["input_ids"], reference["input_ids"])
    assert torch.equal(tokens["attention_mask"], reference["attention_mask"])


def test_unicode_labels_tokenize_like_reference(processor, tokenizer):  # already fine
    labels = ["🐈,🐱", "قطة", "猫", "café,naïve"]
    tokens = processor.encode_vocabulary(labels)
    reference = reference_tokens(tokenizer, resolve_vocabulary(labels).synonyms)
    assert torch.equal(tokens["input_ids"], reference["input_ids"])
    assert tokens["synonym_mask"].tolist() == [[True, True], [True, False], [True, False], [True, True]]


def test_preset_slice_tokenizes_like_reference(processor, tokenizer):
    """Many synonyms per class and padding slots: the same tensors as tokenizing every padded prompt directly."""
    labels = list(load_vocabulary("ade20k_150").names[:20])
    tokens = processor.encode_vocabulary(labels)
    reference = reference_tokens(tokenizer, resolve_vocabulary(labels).synonyms)
    assert torch.equal(tokens["input_ids"], reference["input_ids"])
    assert torch.equal(tokens["attention_mask"], reference["attention_mask"])


def test_labels_equal_after_the_77_token_cut_are_an_error(processor, tokenizer):
    labels = [LONG_PREFIX + "cat", "dog", LONG_PREFIX + "tiger"]
    # reference: the tokenizer itself cuts both long labels' prompts to the same ids in every template
    cut = [tokenizer(concatenated_prompts(label), truncation=True, max_length=77)["input_ids"] for label in labels]
    assert cut[0] == cut[2] and all(len(row) == 77 for row in cut[0])
    with pytest.raises(ValueError, match=r"Duplicate tokens: label 0 \('very very.*and label 2 .*77-token context"):
        processor.encode_vocabulary(labels)


def test_long_synonyms_of_two_classes_colliding_are_an_error(processor):
    with pytest.raises(ValueError, match=r"Duplicate tokens: label 0 .* and label 1 "):
        processor.encode_vocabulary(["dog," + LONG_PREFIX + "a", "cat," + LONG_PREFIX + "b"])


def test_long_label_is_cut_with_a_warning(processor, tokenizer):
    labels = [LONG_PREFIX + "cat", "dog"]
    with pytest.warns(UserWarning, match=r"at most 77 tokens, so the prompts of label 0 \('very very"):
        tokens = processor.encode_vocabulary(labels)
    reference = reference_tokens(tokenizer, [[label] for label in labels])
    assert torch.equal(tokens["input_ids"], reference["input_ids"])
    assert tokens["input_ids"].shape[-1] == 77


def test_short_labels_give_no_warning(processor):  # already fine
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        processor.encode_vocabulary(["cat", ["dog", "puppy"]])  # issue 13: synonyms as a list ("dog,puppy" warns)


def test_processor_call_reports_vocabulary_errors(processor):
    with pytest.raises(TypeError, match=r"candidate_labels is a single dict"):
        processor(candidate_labels={"name": "cat"})
    with pytest.raises(TypeError, match=r"candidate_labels\[0\]\['isthing'\] = 'false'"):
        processor.post_process_panoptic_segmentation(None, candidate_labels=[{"name": "sky", "isthing": "false"}])


# --- seen_class_mask ------------------------------------------------------------------------------------------------


def test_seen_mask_with_preset_name_as_training_vocabulary():
    # a string used to be iterated character by character: "c" was then a seen class
    assert seen_class_mask(resolve_vocabulary(["c", "person"]), "coco").tolist() == [False, True]


def test_seen_mask_accepts_dict_training_classes_and_a_label_list():
    training = [{"name": "person,people", "isthing": True}, "dog"]
    assert seen_class_mask(["people", "unicorn", "dog"], training).tolist() == [True, False, True]


def test_seen_mask_allows_shared_training_synonyms():  # already fine: only the union of synonyms matters
    assert seen_class_mask(resolve_vocabulary(["kitty", "dog"]), ["cat", "cat,kitty"]).tolist() == [True, False]


@pytest.mark.parametrize(
    "training_vocabulary, error, message",
    [
        pytest.param(
            ["person", None],
            TypeError,
            r"training_vocabulary\[1\] = None has type NoneType",
            id="None_entry->TypeError",
        ),
        pytest.param(
            ["person,,people"],
            ValueError,
            r"training_vocabulary\[0\] = 'person,,people' has an empty synonym",
            id="empty_synonym->ValueError",
        ),
        pytest.param(None, TypeError, r"training_vocabulary is None", id="None->TypeError"),
        pytest.param({"person", "dog"}, TypeError, r"training_vocabulary is a set", id="set->TypeError"),
        pytest.param(
            "coco133", ValueError, r"training_vocabulary='coco133' is not a preset", id="preset_typo->ValueError"
        ),
    ],
)
def test_seen_mask_with_malformed_training_vocabulary(training_vocabulary, error, message):
    with pytest.raises(error, match=message):
        seen_class_mask(resolve_vocabulary(["person"]), training_vocabulary)
