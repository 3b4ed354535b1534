"""Speech: Whisper with one adapter per language. Data, model and word error rate.

    audio   WAV bytes -> mono float32 samples, checks (AudioError), resampling to 16 kHz
    corpus  the embedded corpus spoken by espeak-ng; Common Voice-style sources -> SpeechExample
    model   Whisper from a hub id or directory, the embedded tiny default, batches with the
            language token forced per example, batched greedy transcription
    wer     word error rate, unnormalised (as the FLoRA paper) and normalised, per language
"""
