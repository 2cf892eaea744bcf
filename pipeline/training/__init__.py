"""What the train stage composes: its config sections (config: train, eval, checkpoint,
tracking), checkpoint files (checkpoint) and the policy that resumes and saves them
(checkpoint_manager), the optimizers and schedule (optim, muon), metrics and trackers
(tracking), MFU (mfu), precision for the hardware (precision), stop requests (stopping)
and multiple-choice tasks (tasks). A new stateful component is one entry in
train.Training.stateful_parts and its own module here; a new tracker, TRACKERS in
config.py and tracking.py.

Must not know: file formats of data (data/ owns them) or of exports. May import core/,
data/ and model/.
"""
