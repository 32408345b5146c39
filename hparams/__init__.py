"""The default yamls, installed with speech_kd as the package ``speech_kd.hparams`` (read via ``speech_kd.hparams_files``)."""
