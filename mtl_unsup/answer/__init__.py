"""The run's answer, chosen without labels among every stage's clusterings: the candidates and
their criteria (:mod:`.candidates`), the choice at the run's end (:mod:`.choice`)."""
