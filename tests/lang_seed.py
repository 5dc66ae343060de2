"""The seed examples of the SGLang guide, unchanged apart from the import."""

from kvforge.lang import assistant, function, gen, system, user


@function
def tool_use(s, question):
    s += "To answer this question: " + question + ". "
    s += "I need to use a " + gen("tool", choices=["calculator", "search engine"]) + ". "
    if s["tool"] == "calculator":
        s += "The math expression is" + gen("expression")
    elif s["tool"] == "search engine":
        s += "The key word to search is" + gen("word")


@function
def multi_turn_qa(s, question_1, question_2):
    s += system("You are a helpful assistant.")
    s += user(question_1)
    s += assistant(gen("answer_1", max_tokens=256))
    s += user(question_2)
    s += assistant(gen("answer_2", max_tokens=256))
