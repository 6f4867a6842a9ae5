"""The method: the three losses (:mod:`.losses`), the k-means fit (:mod:`.kmeans`) and the training
step that combines them (:mod:`.step`), whose per-step values are named in :mod:`.columns`. Nothing
here knows about run directories or the loop."""
