"""Tools around training: the speed benchmark (:mod:`.bench`), the accuracy guard
(:mod:`.accuracy`) and the GPU check (:mod:`.gpu_check`)."""
