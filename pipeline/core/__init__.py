"""What every room needs and none owns: the error users see and the wrapper that prints
it (errors), what stages say and who says it (log), standard streams that may go away
(console), atomic files (fileio), one writer per directory (locking), and what a config
section is (schema; the sections themselves are their owners').

Must not know: any particular config section, data, models, training. Imports nothing
else of the pipeline.
"""
