"""Speech: Whisper with one adapter per language. Data and word error rate.

    audio   WAV bytes -> mono float32 samples, checks (AudioError), resampling to 16 kHz
    corpus  the embedded corpus spoken by espeak-ng; Common Voice-style sources -> SpeechExample
    wer     word error rate, unnormalised (as the FLoRA paper) and normalised, per language
"""
