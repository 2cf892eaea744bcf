"""What every room needs and none owns: the error users see and the wrapper that prints
it (errors), standard streams that may go away (console), atomic files (fileio), one
writer per directory (locking).

Must not know: configs, data, models, training. Imports nothing else of the pipeline.
"""
