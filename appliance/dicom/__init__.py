"""Everything that speaks DICOM: the SCP, the spool, series completion and assembly."""
