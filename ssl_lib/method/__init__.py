"""The method: the three losses (:mod:`.losses`), the k-means fit (:mod:`.kmeans`) and the training
step that combines them (:mod:`.step`). Nothing here knows about run directories or the loop."""
