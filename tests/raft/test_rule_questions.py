"""Questions Docent writes from the documents alone (no LLM): spans, wh-movement, cloze,
subjects, objects, table rows, another chunk's sentence, and the checks."""

from __future__ import annotations

import pytest

from raft import rule_questions as rq


def _by_answer(sentence: str) -> dict[str, rq.RuleQuestion]:
    """The first question written for each answer (a moved question before its cloze form)."""
    found: dict[str, rq.RuleQuestion] = {}
    for q in rq.sentence_questions(sentence):
        found.setdefault(q.answer, q)
    return found


@pytest.mark.parametrize(
    ("sentence", "answer", "question", "form"),
    [
        (
            "Invitation links to a workspace are valid for 72 hours.",
            "72 hours",
            "How many hours are invitation links to a workspace valid for?",
            "wh",
        ),
        (
            "The Orbit help desk opens at 08:30 on weekdays.",
            "08:30",
            "What time does the Orbit help desk open at on weekdays?",
            "wh",
        ),
        (
            "The Orbit help desk opens at 08:30 on weekdays.",
            "The Orbit help desk",
            "What opens at 08:30 on weekdays?",
            "subject",
        ),
        (
            "The desktop apps include a built-in diagnostic tool called Sync Doctor.",
            "Sync Doctor",
            "What do the desktop apps include a built-in diagnostic tool called?",
            "wh",
        ),
        (
            "Workspace Owners receive an email when the workspace reaches 80 percent of its quota.",
            "Workspace Owners",
            "Who receives an email?",
            "subject",
        ),
        (
            "Failed webhook deliveries are retried 5 times over 24 hours.",
            "5 times",
            "How many times are failed webhook deliveries retried over 24 hours?",
            "wh",
        ),
        (
            "A meal costs 6 EUR.",
            "6 EUR",
            "How much does a meal cost?",
            "wh",
        ),
    ],
)
def test_questions_move_the_wh_phrase_and_keep_the_span_verbatim(sentence, answer, question, form):
    made = _by_answer(sentence)
    assert answer in made, sorted(made)
    q = made[answer]
    assert (q.question, q.form) == (question, form)
    assert q.answer in q.sentence and q.sentence == sentence
    assert rq.check(q) is None


def test_technical_names_are_answers_and_bare_subjects_are_not():
    made = _by_answer("The desktop app writes its sync log to loom-trace.log every minute.")
    assert made["loom-trace.log"].question == (
        "What does the desktop app write its sync log to every minute?"
    )
    assert "The desktop app" not in made  # "What writes its sync log ...?" asks for nothing named
    made = _by_answer("Read the header X-Quill-RateLimit-Remaining for the requests left.")
    assert made["X-Quill-RateLimit-Remaining"].kind == "identifier"


def test_a_moved_question_also_comes_in_cloze_form():
    made = [q for q in rq.sentence_questions("A meal costs 6 EUR.") if q.answer == "6 EUR"]
    assert [(q.question, q.form) for q in made] == [
        ("How much does a meal cost?", "wh"), ("A meal costs how much?", "cloze")
    ]


def test_without_a_verb_the_cloze_form_keeps_the_clause():
    made = _by_answer("A workspace on the Free plan can have at most 3 members and up to "
                      "1,000 pages in total.")
    assert made["1,000 pages"].form == "cloze"
    assert "how many pages" in made["1,000 pages"].question
    assert made["3 members"].question.startswith("How many members can a workspace")


def test_pdf_lines_are_joined_and_headings_stay_apart():
    text = (
        "# Sub-processors\n"
        "Brindlewood Labs will notify the Customer of any new sub-processor at least 28 days\n"
        "before it begins processing Customer Personal Data.\n"
        "Page 1 of 2"
    )
    parts = rq.split_sentences(text)
    assert parts[0] == "# Sub-processors"
    assert parts[1].endswith("before it begins processing Customer Personal Data.")


def test_table_rows_become_questions_about_their_cells():
    text = "# Checklist\nTask | Owner | When\nVerify the email domain | IT | Week 1"
    made = {q.answer: q for q in rq.chunk_questions(text)}
    assert made["IT"].question == "In Checklist, who is responsible for 'Verify the email domain'?"
    assert made["Week 1"].question == "In Checklist, when is 'Verify the email domain' due?"
    assert made["IT"].sentence == "Verify the email domain | IT | Week 1"


def test_checks_reject_a_question_that_holds_its_answer_or_asks_for_another_kind():
    keeps = rq.RuleQuestion("How long do links last?", "72 hours", "Links last 72 hours.",
                            "duration", "wh")
    assert rq.check(keeps) is None
    leaks = rq.RuleQuestion("Do links last 72 hours?", "72 hours", "Links last 72 hours.",
                            "duration", "wh")
    assert rq.check(leaks) == "answer_in_question"
    wrong = rq.RuleQuestion("Who made the links?", "72 hours", "Links last 72 hours.",
                            "duration", "wh")
    assert rq.check(wrong) == "does_not_ask_for_duration"
    cut = rq.RuleQuestion("What is the credit calculated as a percentage of the?", "Monthly Fee",
                          "The credit is calculated as a percentage of the Monthly Fee.",
                          "name", "wh")
    assert rq.check(cut) == "dangling_end"
    stranded = rq.RuleQuestion("What is the Vault appliance made of?", "steel",
                               "The Vault appliance is made of steel.", "name", "wh")
    assert rq.check(stranded) != "dangling_end"


def test_another_chunk_stating_the_same_answer_gets_the_question_in_other_words():
    written = [("a", rq.RuleQuestion(
        "How many hours are invitation links to a workspace valid for?", "72 hours",
        "Invitation links to a workspace are valid for 72 hours.", "duration", "wh"))]
    pool = [
        ("a", "Invitation links to a workspace are valid for 72 hours."),
        ("b", "An invitation link expires after 72 hours, so resend workspace invitations."),
        ("c", "Exports are kept for 72 hours."),  # same answer, another topic
    ]
    cross = rq.cross_sentence(written, pool)
    assert [(cid, q.sentence) for cid, q in cross] == [
        ("b", "An invitation link expires after 72 hours, so resend workspace invitations.")
    ]
    assert cross[0][1].form == "cross" and cross[0][1].answer == "72 hours"


@pytest.mark.parametrize(
    ("sentence", "question", "answer"),
    [
        # A participle after a determiner is an adjective, not the verb: the subject is not
        # "The" and the question is not "What encrypted cache?".
        ("The Quillfeather Vault stores an encrypted cache.", "What stores an encrypted cache?",
         "The Quillfeather Vault"),
        ("An approved deal registration protects the partner's opportunity for 120 days.",
         "How many days does an approved deal registration protect the partner's opportunity "
         "for?", "120 days"),
    ],
)
def test_a_word_after_a_determiner_is_never_the_verb(sentence, question, answer):
    made = {(q.question, q.answer) for q in rq.sentence_questions(sentence)}
    assert (question, answer) in made


def test_a_bare_article_is_never_an_answer():
    # The handbook sentence that once gave "What uploaded file is not ...?" -> "The".
    for sentence in ("The uploaded file is not in a format Quillfeather can import.",
                     "An escalated ticket is reviewed by a team lead within 4 business hours."):
        for q in rq.sentence_questions(sentence):
            assert q.answer.lower() not in ("the", "a", "an"), q


# Rules v6: malformed questions found in the handbook build (run 8's validation questions).
def test_an_answer_never_ends_inside_a_word_or_a_dotted_number():
    for sentence, cut in (
        ("Our own teams test with NVDA and JAWS on Windows and VoiceOver on macOS.", "JAW"),
        ("Each viewer sees the file in Google Drive or OneDrive.", "Google Driv"),
        ("The default management IP address of the QV-200 is 10.44.0.10 with a "
         "255.255.255.0 subnet mask.", "10.44.0"),
    ):
        for q in rq.sentence_questions(sentence):
            words = q.sentence.split()
            assert q.answer in q.sentence and not q.answer.endswith(cut[-3:]) or (
                any(w.strip(".,") == q.answer for w in words)), q


@pytest.mark.parametrize(
    ("sentence", "bad"),
    [
        ("SEPA refunds take up to 3 business days.", "take up"),  # "refunds" taken for the verb
        ("Most simultaneous edits merge without any problem.", "merge without any problem"),
        ("Engineers from the affected team investigate and fix the problem.",
         "investigate and fix the problem"),
        ("Changing it signs out every other session.", "out every other session"),
    ],
)
def test_an_object_answer_is_a_noun_phrase(sentence, bad):
    assert bad not in {q.answer for q in rq.sentence_questions(sentence)}


def test_no_do_support_in_front_of_an_auxiliary_and_no_cut_list():
    made = [q.question for s in (
        "Our data protection officer is Maren Tillhagen, who can be reached at "
        "privacy@quillfeather.app.",
        "Quillfeather is sold in four plans: Free, Plus, Pro and Enterprise.",
        "Support is provided in English, Estonian and German.",
    ) for q in rq.sentence_questions(s) if rq.check(q) is None]
    assert made  # the sentences still give questions
    assert not any(" did can " in q or q.endswith((",?", ", what?")) for q in made), made


def test_a_bare_number_carries_the_noun_it_counts_and_units_are_plural():
    made = _by_answer("A page can have up to 100 named versions.")
    assert made["100"].question == "How many named versions can a page have up to?"
    made = _by_answer("The incident commander checks their progress after one month.")
    assert made["one month"].question.startswith("How many months ")


# Rules v7: the question kinds support documentation is asked most (where a setting lives,
# what a term means, what a role may do), from the handbook sentences that gave none in v6.
@pytest.mark.parametrize(
    ("sentence", "question", "answer"),
    [
        ("An owner can close a workspace from Settings > Workspace > Close workspace.",
         "Where can an owner close a workspace?", "Settings > Workspace > Close workspace"),
        ("Correct your name and email in Profile > Account.",
         "Where can you correct your name and email?", "Profile > Account"),
        ("You can download all previous invoices from Settings > Billing > Invoice history.",
         "Where can you download all previous invoices?", "Settings > Billing > Invoice history"),
        ("Support staff cannot see your content unless an owner grants support access from "
         "Settings > Workspace > Support access.",
         "Where does an owner grant support access?", "Settings > Workspace > Support access"),
        ("If your phone is shared, turn on App lock under Settings > Privacy.",
         "Where can you turn on App lock?", "Settings > Privacy"),
    ],
)
def test_a_settings_path_after_a_place_preposition_asks_where(sentence, question, answer):
    made = _by_answer(sentence)
    assert made[answer].question == question and made[answer].kind == "path"
    assert rq.check(made[answer]) is None


def test_a_path_that_names_a_step_or_a_pronoun_is_not_asked():
    # "Open X > Y and choose ..." is a step, not a place; "it" needs the sentence before.
    assert not [q for q in rq.sentence_questions(
        "In the admin console, open Infrastructure > Vault and choose Add appliance.")
        if q.kind == "path"]
    made = _by_answer("You can open it from Settings > Advanced > Sync Doctor.")
    assert rq.check(made["Settings > Advanced > Sync Doctor"]) == "vague_reference"


def test_a_definition_asks_what_the_term_is():
    made = _by_answer("A shelf is a collection of pages about one subject, such as "
                      "\"Engineering\" or \"Onboarding\".")
    q = made["a collection of pages about one subject"]
    assert (q.question, q.kind) == ("What is a shelf?", "definition")
    assert _by_answer("A **page** is a single document.")["a single document"].question == (
        "What is a page?")


@pytest.mark.parametrize(
    ("sentence", "question", "answer"),
    [
        ("An admin can empty the trash early.", "What can an admin empty?", "the trash"),
        ("Only workspace owners can start a full workspace export.",
         "What can only workspace owners start?", "a full workspace export"),
        ("The SAML assertion must contain the user's email address.",
         "What must the SAML assertion contain?", "the user's email address"),
    ],
)
def test_a_modal_moves_alone_before_its_bare_verb(sentence, question, answer):
    made = _by_answer(sentence)
    assert made[answer].question == question and made[answer].kind == "object"


@pytest.mark.parametrize(
    "sentence",
    [
        "Support staff will never ask you for your password.",  # negated: asks what is not so
        "Enterprise workspaces can let members sign in with SAML.",  # causative: half a clause
        "The archive can be restored by an owner.",  # passive: no object
    ],
)
def test_no_object_question_for_negated_causative_or_passive_modals(sentence):
    assert not [q for q in rq.sentence_questions(sentence) if q.kind == "object"]


def test_no_question_from_a_pronoun_subject_an_embedded_question_or_a_cut_noun_phrase():
    # Run 9's validation questions: "How many days does we answer request ... within?",
    # "What does this runbook describe how responds to incidents?", "... to the are ...?"
    made = [q.question for s in (
        "We answer requests from individuals about their personal data within 30 days.",
        "This runbook describes how Brindlewood Labs responds to incidents.",
        "Material changes to the Privacy Notice are announced by email at least 30 days ahead.",
    ) for q in rq.sentence_questions(s) if rq.check(q) is None]
    assert made  # the third still gives its duration question
    assert not any("does we " in q or " how responds" in q or " the are " in q for q in made)


def test_a_cloze_needs_a_clause_and_an_answer_is_never_glued_to_an_operator():
    # Run 9's training questions "Head of Channel Sales at what?" (a title, no verb) and
    # "The search roadmap by:maria after: what date -draft ...?" (half of a search operator).
    made = [q.question for s in (
        "Dear partners, this memo was written by Ines Calloway, Head of Channel Sales at "
        "Brindlewood Labs, to explain the changes.",
        "For example, the search roadmap by:maria after:2025-01-01 -draft finds pages.",
    ) for q in rq.sentence_questions(s)]
    assert "Head of Channel Sales at what?" not in made
    assert not any("after: what" in q or "Head of Channel" in q.split("by")[0] for q in made)
    assert "We reply to accessibility feedback within how many working days?" in [
        q.question for q in rq.sentence_questions(
            "Write to us; we reply to accessibility feedback within 3 working days.")]
