"""A budget is a plan: measure each stage's cost (:mod:`.probe`), size its epochs to end in time
(:mod:`.budget`), and keep the run to it as it goes (:mod:`.run`)."""
