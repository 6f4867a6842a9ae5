"""The HTML report: what notebook pages display (:mod:`.display`), their figures (:mod:`.plots`), and
executing them into HTML pages with an index (:mod:`.build`)."""
