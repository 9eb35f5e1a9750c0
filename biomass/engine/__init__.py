"""Training one fold: build components from config (`build`), the loop (`loop`), checkpoints and resumable state
(`checkpoint`), and the optimizer registry (`optimizers`)."""
