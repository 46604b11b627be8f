"""Atlas class names (AAL: ``Frontal_Mid_L``) become phrases a sentence encoder can tell apart: the side spelt out
first, abbreviations spelt out (issue 30: text prompts on 8 brain structures scored 0)."""

from samadapt.text.phrases import build_phrase_book, class_for_phrase, plain_name


def test_sides_and_abbreviations_are_spelt_out():
    assert plain_name("Frontal_Mid_L") == "left frontal middle"
    assert plain_name("Frontal_Mid_R") == "right frontal middle"
    assert plain_name("Temporal_Sup_R") == "right temporal superior"
    assert plain_name("kidney_left") == plain_name("left_kidney") == "left kidney"
    assert plain_name("lh-hippocampus") == "left hippocampus"
    # unchanged: names without those words, and a lone letter
    assert plain_name("grey matter") == "grey matter" and plain_name("Brainstem") == "brainstem"
    assert plain_name("L") == "l"


def test_the_phrase_book_of_atlas_names_pairs_the_sides_and_finds_them_again():
    names = {1: "Frontal_Mid_L", 2: "Frontal_Mid_R", 3: "Precentral_L", 4: "Precentral_R"}
    book = build_phrase_book(names, "MRI")
    left, right = book.for_class(1), book.for_class(2)
    assert "left frontal middle" in left.train and "right frontal middle" in right.train
    assert "frontal middle on the left side" in left.train
    assert not set(left.train) & set(right.train)
    groups = {g.targets: g for g in book.groups}
    assert "left and right frontal middle" in groups[(1, 2)].train  # the two sides of one structure
    assert "both sides of the precentral" in groups[(3, 4)].train
    manifest = {**book.to_dict()}
    assert class_for_phrase(manifest, "Frontal_Mid_R", default=0) == 2
    assert class_for_phrase(manifest, "the right frontal middle", default=0) == 2
